//! Directory groups (`[ldap]`, `[[policy.exceptions]] groups`) against a
//! real OpenLDAP `slapd` each test starts on a loopback port with a
//! throwaway database (the memberof overlay on, so both ways of reading
//! membership work): a member of a group gets the group's exception and
//! others do not, Basic checked by a bind, the fallback when the directory
//! goes away, reload, and `check-config` / `classify --group` through the
//! binary. Skipped with a printed reason without Debian's `slapd` and
//! `ldap-utils` (mandatory with CHATWALL_REQUIRE_ALL=1).
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{read_response, skip_or_fail, HttpOrigin, Proxy, WAIT};

const SLAPD: &str = "/usr/sbin/slapd";
const LDAPADD: &str = "/usr/bin/ldapadd";
const SCHEMA: &str = "/etc/ldap/schema";
const MODULES: &str = "/usr/lib/ldap";
const SUFFIX: &str = "dc=example,dc=com";
const ROOT_DN: &str = "cn=admin,dc=example,dc=com";
const ROOT_PW: &str = "admin-secret";

/// alice is in `sales`, bob in `support`, carol in no group; each one's
/// password is `NAME-pw`.
const ENTRIES: &str = "dn: dc=example,dc=com
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,dc=example,dc=com
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=com
objectClass: organizationalUnit
ou: groups

dn: uid=alice,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: A
userPassword: alice-pw

dn: uid=bob,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: B
userPassword: bob-pw

dn: uid=carol,ou=people,dc=example,dc=com
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: C
userPassword: carol-pw

dn: cn=sales,ou=groups,dc=example,dc=com
objectClass: groupOfNames
cn: sales
member: uid=alice,ou=people,dc=example,dc=com

dn: cn=support,ou=groups,dc=example,dc=com
objectClass: groupOfNames
cn: support
member: uid=bob,ou=people,dc=example,dc=com
";

/// A slapd child on a loopback port, killed on drop.
struct Slapd {
    child: Option<Child>,
    addr: SocketAddr,
    /// With TLS: the ldaps:// address, and the certificate's PEM file
    /// (self-signed, for 127.0.0.1), which StartTLS on `addr` uses too.
    ldaps: Option<(SocketAddr, PathBuf)>,
    dir: tempfile::TempDir,
}

impl Slapd {
    /// Start and populate one, or say why not (and skip, or fail under
    /// CHATWALL_REQUIRE_ALL=1).
    fn start() -> Option<Slapd> {
        Slapd::start_with(false)
    }

    fn start_with(tls: bool) -> Option<Slapd> {
        for need in [SLAPD, LDAPADD, SCHEMA] {
            if !Path::new(need).exists() {
                skip_or_fail(&format!(
                    "{need} is missing (apt-get install slapd ldap-utils)"
                ));
                return None;
            }
        }
        // A port that was free a moment ago may be taken by the time slapd
        // binds: a few tries.
        for _ in 0..5 {
            if let Some(s) = Slapd::try_start(tls) {
                s.populate();
                return Some(s);
            }
        }
        panic!("slapd did not start on any of 5 ports");
    }

    fn try_start(tls: bool) -> Option<Slapd> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        std::fs::create_dir(&db).expect("mkdir db");
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let addr = free();
        let mut urls = format!("ldap://{addr}/");
        let mut tls_conf = String::new();
        let ldaps = tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
                .expect("certificate");
            let cert = dir.path().join("cert.pem");
            let key = dir.path().join("key.pem");
            std::fs::write(&cert, ck.cert.pem()).expect("write cert");
            std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
            tls_conf = format!(
                "TLSCertificateFile {}\nTLSCertificateKeyFile {}\n",
                cert.display(),
                key.display()
            );
            let ldaps = free();
            urls.push_str(&format!(" ldaps://{ldaps}/"));
            (ldaps, cert)
        });
        let modules = if Path::new(MODULES).join("back_mdb.so").exists() {
            format!("modulepath {MODULES}\nmoduleload back_mdb\nmoduleload memberof\n")
        } else {
            String::new()
        };
        let conf = dir.path().join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "include {SCHEMA}/core.schema\ninclude {SCHEMA}/cosine.schema\ninclude {SCHEMA}/inetorgperson.schema\n{modules}{tls_conf}pidfile {}\ndatabase mdb\nsuffix \"{SUFFIX}\"\nrootdn \"{ROOT_DN}\"\nrootpw {ROOT_PW}\ndirectory {}\nmaxsize 10485760\noverlay memberof\n",
                dir.path().join("slapd.pid").display(),
                db.display()
            ),
        )
        .expect("write slapd.conf");
        // `-d 0`: in the foreground (a child this test can kill), quiet.
        let child = Command::new(SLAPD)
            .args(["-h", &urls, "-f"])
            .arg(&conf)
            .args(["-d", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn slapd");
        let mut s = Slapd {
            child: Some(child),
            addr,
            ldaps,
            dir,
        };
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    // Gone already (the port was taken, most likely).
                    s.child = None;
                    return None;
                }
            }
            let up = |a: &SocketAddr| {
                std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
            };
            if up(&addr) && s.ldaps.as_ref().map_or(true, |(a, _)| up(a)) {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("slapd did not listen on {addr} within {WAIT:?}");
    }

    fn populate(&self) {
        let ldif = self.dir.path().join("entries.ldif");
        std::fs::write(&ldif, ENTRIES).expect("write ldif");
        let out = Command::new(LDAPADD)
            .args(["-x", "-H", &self.url(), "-D", ROOT_DN, "-w", ROOT_PW, "-f"])
            .arg(&ldif)
            .stdin(Stdio::null())
            .output()
            .expect("run ldapadd");
        assert!(
            out.status.success(),
            "ldapadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!("ldap://{}", self.addr)
    }

    /// The directory goes away.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The bind password, in a file only its owner may read.
fn password_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("bind.pw");
    std::fs::write(&p, format!("{ROOT_PW}\n")).expect("write password");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

/// `[ldap]` for `slapd` with `extra` keys.
fn ldap_section(slapd: &Slapd, url: &str, extra: &str) -> String {
    format!(
        "[ldap]\nurl = {url:?}\nbind_dn = {ROOT_DN:?}\nbind_password_file = {:?}\nbase_dn = {SUFFIX:?}\nuser_filter = \"(&(objectClass=inetOrgPerson)(uid={{user}}))\"\n{extra}\n",
        password_file(slapd.dir.path()).display().to_string()
    )
}

/// A users file for alice, bob and carol (their directory passwords).
fn users_file(dir: &Path) -> PathBuf {
    let p = dir.join("users");
    let mut text = String::new();
    for u in ["alice", "bob", "carol"] {
        text.push_str(&chatwall::auth::hash_line(u, &format!("{u}-pw")).expect("hash"));
        text.push('\n');
    }
    std::fs::write(&p, text).expect("write users");
    p
}

/// The app `loopback` (the name `localhost`) of a signature directory
/// written for the test: an IM app that a loopback origin can stand for.
fn loopback_signatures(dir: &Path) -> PathBuf {
    let sigs = dir.join("sigs");
    std::fs::create_dir_all(&sigs).expect("mkdir");
    std::fs::write(
        sigs.join("loopback.toml"),
        "id = \"loopback\"\nname = \"Loopback\"\ncategory = \"consumer-im\"\n[[hosts]]\nnames = [\"localhost\"]\nsource = \"test fixture\"\n",
    )
    .expect("write sig");
    sigs
}

const EXCEPTIONS: &str = "[[policy.exceptions]]
name = \"sales-im\"
groups = [\"sales\"]
apps = [\"loopback\"]
action = \"allow\"

[[policy.exceptions]]
name = \"support-watch\"
groups = [\"CN=Support, OU=Groups, DC=example, DC=com\"]
apps = [\"loopback\"]
action = \"monitor\"
";

/// A proxy for `localhost` requests, with `sections` after the test's
/// signatures.
async fn proxy(dir: &Path, sections: &str) -> Proxy {
    let sigs = loopback_signatures(dir);
    Proxy::start(&format!(
        "[access]\ndeny_destinations = []\n[signatures]\ndir = {:?}\n{sections}",
        sigs.display().to_string()
    ))
    .await
}

/// `GET http://localhost:PORT/` as `user:password` (none: no
/// credentials): (status, head).
async fn get_as(proxy: &Proxy, origin: &HttpOrigin, creds: Option<&str>) -> (u16, String) {
    get_at(proxy.addr, origin.addr.port(), creds).await
}

async fn get_at(proxy: SocketAddr, port: u16, creds: Option<&str>) -> (u16, String) {
    use base64::Engine as _;
    let auth = creds
        .map(|c| {
            format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        })
        .unwrap_or_default();
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(
        format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = tokio::time::timeout(WAIT, read_response(&mut s))
        .await
        .expect("an answer in time");
    (status, head.to_ascii_lowercase())
}

/// The last access-log record of `user`.
async fn last_record_of(proxy: &Proxy, user: &str, n: usize) -> serde_json::Value {
    let log = proxy.wait_log(n).await;
    log.iter()
        .rev()
        .find(|r| r["user"] == user)
        .cloned()
        .unwrap_or_else(|| panic!("no record of {user} in {log:?}"))
}

/// The first access-log record that `matches`, waited for (bounded).
async fn record_where(
    proxy: &Proxy,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..200 {
        if let Some(r) = proxy.log().into_iter().find(&matches) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no such record in {:?}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gets_the_groups_exception_and_others_do_not() {
    let Some(slapd) = Slapd::start() else { return };
    let origin = HttpOrigin::start().await;
    // memberOf (the overlay), then a search for groupOfNames entries.
    for membership in [
        "group_attribute = \"memberOf\"",
        "group_filter = \"(&(objectClass=groupOfNames)(member={dn}))\"",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let users = users_file(dir.path());
        let proxy = proxy(
            dir.path(),
            &format!(
                "[auth]\nusers_file = {:?}\n{}{EXCEPTIONS}",
                users.display().to_string(),
                ldap_section(&slapd, &slapd.url(), membership)
            ),
        )
        .await;

        let (status, _) = get_as(&proxy, &origin, Some("alice:alice-pw")).await;
        assert_eq!(status, 200, "{membership}: alice is in sales");
        let (status, head) = get_as(&proxy, &origin, Some("carol:carol-pw")).await;
        assert_eq!(status, 403, "{membership}: carol is in no group");
        assert!(head.contains("x-chatwall-block: loopback"), "{head}");
        let rec = last_record_of(&proxy, "carol", 2).await;
        assert_eq!(rec["verdict"], "block", "{rec}");
        assert!(
            rec["exception"].is_null() && rec["group"].is_null(),
            "{rec}"
        );

        // bob's group, named by its DN in another spelling: monitored, and
        // the log names user, exception and group.
        let (status, _) = get_as(&proxy, &origin, Some("bob:bob-pw")).await;
        assert_eq!(status, 200, "{membership}: bob is monitored");
        let rec = last_record_of(&proxy, "bob", 3).await;
        assert_eq!(rec["verdict"], "monitor", "{rec}");
        assert_eq!(rec["exception"], "support-watch", "{rec}");
        assert_eq!(
            rec["group"], "cn=support,ou=groups,dc=example,dc=com",
            "{rec}"
        );
        assert_eq!(
            proxy
                .metric("chatwall_group_decisions_total{action=\"monitor\",exception=\"support-watch\",group=\"cn=support,ou=groups,dc=example,dc=com\"}")
                .await,
            1.0
        );

        // A tunnel of bob's: its record names them too.
        {
            use base64::Engine as _;
            let port = origin.addr.port();
            let creds = base64::engine::general_purpose::STANDARD.encode("bob:bob-pw");
            let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
            s.write_all(
                format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: Basic {creds}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
            let (status, head, _) = tokio::time::timeout(WAIT, read_response(&mut s))
                .await
                .expect("an answer in time");
            assert_eq!(status, 200, "{head}");
            s.write_all(
                format!("GET / HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("write");
            let (status, _, _) = tokio::time::timeout(WAIT, read_response(&mut s))
                .await
                .expect("an answer in time");
            assert_eq!(status, 200, "through the tunnel");
        }
        // (A request inside the tunnel has its own record, which names the
        // user and the exception.)
        let rec = record_where(&proxy, |r| r["method"] == "CONNECT").await;
        assert_eq!(rec["user"], "bob", "{rec}");
        assert_eq!(rec["verdict"], "monitor", "{rec}");
        assert_eq!(rec["exception"], "support-watch", "{rec}");
        assert_eq!(
            rec["group"], "cn=support,ou=groups,dc=example,dc=com",
            "{rec}"
        );

        // Again: from the cache.
        let (status, _) = get_as(&proxy, &origin, Some("alice:alice-pw")).await;
        assert_eq!(status, 200);
        assert_eq!(
            proxy
                .metric("chatwall_directory_lookups_total{result=\"miss\"}")
                .await,
            3.0,
            "{membership}"
        );
        assert_eq!(
            proxy
                .metric("chatwall_directory_lookups_total{result=\"hit\"}")
                .await,
            2.0
        );
        assert_eq!(
            proxy
                .metric("chatwall_directory_lookups_total{result=\"unavailable\"}")
                .await,
            0.0
        );
        // A wrong password is refused before any group is read.
        let (status, _) = get_as(&proxy, &origin, Some("alice:nope")).await;
        assert_eq!(status, 407);
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_reached_over_starttls_and_ldaps() {
    let Some(slapd) = Slapd::start_with(true) else {
        return;
    };
    let (ldaps, cert) = slapd.ldaps.clone().expect("tls");
    let origin = HttpOrigin::start().await;
    let cert = cert.display().to_string();
    for (url, tls) in [
        (slapd.url(), "starttls = true"),
        (format!("ldaps://{ldaps}"), ""),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = proxy(
            dir.path(),
            &format!(
                "{}{EXCEPTIONS}",
                ldap_section(
                    &slapd,
                    &url,
                    &format!("{tls}\nca_file = {cert:?}\nbasic_bind = true")
                )
            ),
        )
        .await;
        assert_eq!(
            get_as(&proxy, &origin, Some("alice:alice-pw")).await.0,
            200,
            "{url} {tls}"
        );
        assert_eq!(get_as(&proxy, &origin, Some("carol:carol-pw")).await.0, 403);
        assert_eq!(
            proxy
                .metric("chatwall_directory_lookups_total{result=\"miss\"}")
                .await,
            2.0
        );
        proxy.stop().await;
    }
    // A certificate the configuration does not trust: no bind, no groups.
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = proxy(
        dir.path(),
        &format!(
            "{}{EXCEPTIONS}",
            ldap_section(&slapd, &format!("ldaps://{ldaps}"), "basic_bind = true")
        ),
    )
    .await;
    assert_eq!(get_as(&proxy, &origin, Some("alice:alice-pw")).await.0, 407);
    assert_eq!(
        proxy
            .metric("chatwall_directory_binds_total{result=\"unavailable\"}")
            .await,
        1.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_flows_of_one_user_share_one_query() {
    let Some(slapd) = Slapd::start() else { return };
    let origin = HttpOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path());
    let proxy = proxy(
        dir.path(),
        &format!(
            "[auth]\nusers_file = {:?}\n{}{EXCEPTIONS}",
            users.display().to_string(),
            ldap_section(&slapd, &slapd.url(), "")
        ),
    )
    .await;
    let mut flows = tokio::task::JoinSet::new();
    for _ in 0..8 {
        flows.spawn(get_at(
            proxy.addr,
            origin.addr.port(),
            Some("alice:alice-pw"),
        ));
    }
    while let Some(done) = flows.join_next().await {
        assert_eq!(done.expect("flow").0, 200);
    }
    let misses = proxy
        .metric("chatwall_directory_lookups_total{result=\"miss\"}")
        .await;
    let hits = proxy
        .metric("chatwall_directory_lookups_total{result=\"hit\"}")
        .await;
    assert_eq!(misses + hits, 8.0);
    assert!(misses <= 2.0, "{misses} queries for one user");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_is_checked_by_a_bind_to_the_directory() {
    let Some(mut slapd) = Slapd::start() else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = proxy(
        dir.path(),
        &format!(
            "{}{EXCEPTIONS}",
            ldap_section(&slapd, &slapd.url(), "basic_bind = true")
        ),
    )
    .await;
    assert_eq!(get_as(&proxy, &origin, None).await.0, 407);
    assert_eq!(get_as(&proxy, &origin, Some("alice:alice-pw")).await.0, 200);
    assert_eq!(get_as(&proxy, &origin, Some("alice:wrong")).await.0, 407);
    assert_eq!(get_as(&proxy, &origin, Some("alice:")).await.0, 407);
    assert_eq!(get_as(&proxy, &origin, Some("mallory:x")).await.0, 407);
    assert_eq!(get_as(&proxy, &origin, Some("*:alice-pw")).await.0, 407);
    // A directory user outside the group: authenticated, then blocked.
    assert_eq!(get_as(&proxy, &origin, Some("carol:carol-pw")).await.0, 403);
    assert_eq!(
        proxy
            .metric("chatwall_directory_binds_total{result=\"ok\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric("chatwall_directory_binds_total{result=\"wrong\"}")
            .await,
        4.0
    );
    // A remembered bind needs no directory; a new one does, and fails
    // closed.
    slapd.stop();
    assert_eq!(get_as(&proxy, &origin, Some("alice:alice-pw")).await.0, 200);
    assert_eq!(get_as(&proxy, &origin, Some("bob:bob-pw")).await.0, 407);
    assert_eq!(
        proxy
            .metric("chatwall_directory_binds_total{result=\"unavailable\"}")
            .await,
        1.0
    );
    proxy.stop().await;
}

/// alice is allowed while the directory answers; then it goes away and,
/// once her cached groups expire, `on_unavailable` decides.
async fn after_the_directory_goes_away(on_unavailable: &str) -> (u16, f64) {
    let mut slapd = Slapd::start().expect("checked by the caller");
    let origin = HttpOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path());
    let proxy = proxy(
        dir.path(),
        &format!(
            "[auth]\nusers_file = {:?}\n{}{EXCEPTIONS}",
            users.display().to_string(),
            ldap_section(
                &slapd,
                &slapd.url(),
                &format!(
                    "cache_ttl_ms = 200\ntimeout_ms = 1000\non_unavailable = {on_unavailable:?}"
                )
            )
        ),
    )
    .await;
    assert_eq!(get_as(&proxy, &origin, Some("alice:alice-pw")).await.0, 200);
    slapd.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = get_as(&proxy, &origin, Some("alice:alice-pw")).await;
    let unavailable = proxy
        .metric("chatwall_directory_lookups_total{result=\"unavailable\"}")
        .await;
    proxy.stop().await;
    (status, unavailable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_goes_away_applies_the_configured_fallback() {
    if Slapd::start().is_none() {
        return;
    }
    // no-groups: the group exception no longer applies (fail closed).
    assert_eq!(after_the_directory_goes_away("no-groups").await, (403, 1.0));
    // stale: the groups last read still count.
    assert_eq!(after_the_directory_goes_away("stale").await, (200, 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_directory_settings_again_and_forgets_the_cache() {
    let Some(slapd) = Slapd::start() else { return };
    let origin = HttpOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = users_file(dir.path());
    // First a port nobody listens on: the fallback (no groups) applies and
    // is kept for a while.
    let dead = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let sections = |url: &str| {
        format!(
            "[auth]\nusers_file = {:?}\n{}{EXCEPTIONS}",
            users.display().to_string(),
            ldap_section(&slapd, url, "cache_ttl_ms = 60000")
        )
    };
    let proxy = proxy(dir.path(), &sections(&format!("ldap://{dead}"))).await;
    assert_eq!(get_as(&proxy, &origin, Some("alice:alice-pw")).await.0, 403);
    let text = std::fs::read_to_string(&proxy.config_path).expect("read config");
    let text = text.replace(&format!("ldap://{dead}"), &slapd.url());
    std::fs::write(&proxy.config_path, text).expect("write config");
    let (status, body) = proxy.admin_post("/-/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_as(&proxy, &origin, Some("alice:alice-pw")).await.0, 200);
    proxy.stop().await;
}

/// The binary, bounded, without the caller's `CHATWALL*` environment:
/// (exit code, stdout, stderr).
fn chatwall(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatwall"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHATWALL") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chatwall");
    let deadline = Instant::now() + WAIT * 3;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatwall {args:?} did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(dir: &Path, text: &str) -> String {
    let path = dir.join("chatwall.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// An anonymous directory on a port nobody listens on: enough for
/// `check-config` and `classify`, which never ask it.
const NO_DIRECTORY: &str =
    "[ldap]\nurl = \"ldap://127.0.0.1:9\"\nbase_dn = \"dc=example,dc=com\"\n";

#[test]
fn check_config_validates_groups_and_the_directory_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exception = "[[policy.exceptions]]\nname = \"sales-im\"\napps = [\"slack\"]\naction = \"allow\"\ngroups = [\"sales\"]\n";
    // Groups without a directory.
    let file = config(dir.path(), exception);
    let (code, _, err) = chatwall(&["check-config", "-c", &file]);
    assert_eq!(code, Some(1), "{err}");
    let want = format!("{file}:5: policy.exceptions.groups: ");
    assert!(
        err.lines().any(|l| l.starts_with(&want)),
        "no `{want}` in:\n{err}"
    );

    // With one it is fine.
    let file = config(dir.path(), &format!("{exception}\n{NO_DIRECTORY}"));
    let (code, out, err) = chatwall(&["check-config", "-c", &file]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().last(), Some("ok"), "{out}");

    // Bad directory settings, each with its line.
    let pw = dir.path().join("open.pw");
    std::fs::write(&pw, "secret\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let pw = pw.display().to_string();
    for (section, line, field, says) in [
        (
            "[ldap]\nurl = \"ldap://directory.example.com\"\nbase_dn = \"dc=x\"\n".to_string(),
            2,
            "ldap.url",
            "clear",
        ),
        (
            "[ldap]\nurl = \"http://x\"\nbase_dn = \"dc=x\"\n".to_string(),
            2,
            "ldap.url",
            "ldaps://",
        ),
        (
            "[ldap]\nurl = \"ldaps://x\"\nbase_dn = \"dc=x\"\nuser_filter = \"(uid=alice)\"\n".to_string(),
            4,
            "ldap.user_filter",
            "{user}",
        ),
        (
            "[ldap]\nurl = \"ldaps://x\"\nbase_dn = \"dc=x\"\ngroup_filter = \"(member={dn}\"\n".to_string(),
            4,
            "ldap.group_filter",
            "filter",
        ),
        (
            "[ldap]\nurl = \"ldaps://x\"\nbase_dn = \"dc=x\"\non_unavailable = \"allow\"\n".to_string(),
            4,
            "ldap.on_unavailable",
            "no-groups, stale",
        ),
        (
            format!("[ldap]\nurl = \"ldaps://x\"\nbase_dn = \"dc=x\"\nbind_dn = \"cn=a\"\nbind_password_file = {pw:?}\n"),
            0,
            "ldap.bind_password_file",
            "chmod 600",
        ),
    ] {
        let file = config(dir.path(), &section);
        let (code, _, err) = chatwall(&["check-config", "-c", &file]);
        assert_eq!(code, Some(1), "{section}: {err}");
        let want = if line == 0 {
            format!("{pw}: {field}: ")
        } else {
            format!("{file}:{line}: {field}: ")
        };
        assert!(
            err.lines().any(|l| l.starts_with(&want) && l.contains(says)),
            "no `{want}…{says}` in:\n{err}"
        );
    }
}

#[test]
fn classify_takes_groups_without_asking_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(
        dir.path(),
        &format!("[[policy.exceptions]]\nname = \"sales-im\"\napps = [\"slack\"]\naction = \"allow\"\ngroups = [\"sales\"]\n\n{NO_DIRECTORY}"),
    );
    let classify = |extra: &[&str]| {
        let mut args = vec![
            "classify",
            "host",
            "app.slack.com",
            "-c",
            &file,
            "--user",
            "alice",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = chatwall(&args);
        assert_eq!(code, Some(0), "{err}");
        out
    };
    let out = classify(&["--group", "Support", "--group", "Sales"]);
    let first = out.lines().next().unwrap_or("");
    assert_eq!(first, "allow app.slack.com:443 exception=sales-im", "{out}");
    assert!(out.contains("through group sales"), "{out}");
    let out = classify(&["--group", "support"]);
    assert_eq!(out.lines().next(), Some("block app.slack.com:443"), "{out}");
    let out = classify(&[]);
    assert_eq!(out.lines().next(), Some("block app.slack.com:443"), "{out}");
}
