//! A real browser through the proxy: headless Chromium (Debian's
//! `chromium`) with `--proxy-server` pointing at chatwall, chatwall's test
//! CA trusted through an NSS database in a temporary HOME (where Chromium
//! on Linux looks for local trust anchors), and `[tls_inspect]` decrypting
//! flows from loopback. An allowed HTTPS page must render as the origin
//! served it; a refused name and an IM path inside an allowed HTTPS host
//! must show chatwall's block page, not a certificate interstitial or a
//! network error page. Everything stays on loopback: the refused name is
//! refused at CONNECT before any lookup, and so are the Google hosts
//! Chromium asks for by itself (`BACKGROUND`), which each test checks.
//!
//! Without `chromium` or `certutil` (Debian `libnss3-tools`) the tests
//! skip, or fail under `CHATWALL_REQUIRE_ALL=1`.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{self, Proxy};

/// Bound on one browser run (start, load, dump, exit).
const BROWSER_LIMIT: Duration = Duration::from_secs(60);

/// The page the origin serves at `/`.
const PAGE: &str = "<html><body><p id=\"x\">hello inside</p></body></html>";

/// The DOM Chromium builds from `PAGE` and prints with `--dump-dom`: the
/// parser adds the implied `<head>`, nothing else changes.
const PAGE_DOM: &str = "<html><head></head><body><p id=\"x\">hello inside</p></body></html>";

/// One browser at a time: each starts several processes, and the tests
/// share a small machine with the rest of the suite.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An HTTPS origin for `localhost` that records the plaintext of every
/// connection and answers each request head (browsers send no bodies on
/// navigations): `PAGE` at `/`, an empty 404 elsewhere.
struct PageOrigin {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    accepted: Arc<AtomicUsize>,
    cert_pem: PathBuf,
    _dir: tempfile::TempDir,
}

impl PageOrigin {
    async fn start() -> PageOrigin {
        let (cfg, cert) = support::tls_server_config(&["localhost"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let cert_pem = dir.path().join("origin.pem");
        std::fs::write(&cert_pem, pem(&cert)).expect("write pem");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let (rec, acc) = (Arc::clone(&received), Arc::clone(&accepted));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (acceptor, rec) = (acceptor.clone(), Arc::clone(&rec));
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) =
                        tokio::time::timeout(support::WAIT, acceptor.accept(s)).await
                    else {
                        return;
                    };
                    let i = {
                        let mut r = rec.lock().expect("lock");
                        r.push(Vec::new());
                        r.len() - 1
                    };
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        rec.lock().expect("lock")[i].extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = pending.drain(..end + 4).collect();
                            if tls.write_all(&answer(&head)).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        PageOrigin {
            addr,
            received,
            accepted,
            cert_pem,
            _dir: dir,
        }
    }

    /// Everything the origin read, all connections, in order.
    fn received(&self) -> String {
        let r = self.received.lock().expect("lock");
        r.iter()
            .map(|c| String::from_utf8_lossy(c).to_string())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The request lines the origin read.
    fn request_lines(&self) -> Vec<String> {
        self.received()
            .split("\r\n\r\n")
            .filter_map(|head| head.lines().next())
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }
}

/// A certificate in PEM.
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A page whose script fetches `/bytes` (synchronously, so before the
/// load event `--dump-dom` waits for) and writes its status, length and
/// bytes in hex into `#x`.
const BYTES_PAGE: &str = r#"<html><body><p id="x">not run</p><script>
var r = new XMLHttpRequest();
r.open("GET", "/bytes", false);
r.overrideMimeType("text/plain; charset=x-user-defined");
r.send();
var t = r.responseText, h = "";
for (var i = 0; i < t.length; i++) h += ("0" + (t.charCodeAt(i) & 255).toString(16)).slice(-2);
document.getElementById("x").textContent = r.status + " " + t.length + " " + h;
</script></body></html>"#;

/// `/bytes`: every byte value once, in a scrambled order (NUL, CR, LF and
/// high bytes in the middle of the body).
fn bytes_body() -> Vec<u8> {
    (0..256u32).map(|i| ((i * 167 + 13) % 256) as u8).collect()
}

/// The origin's answer to one request head.
fn answer(head: &[u8]) -> Vec<u8> {
    let line = String::from_utf8_lossy(head);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (ctype, body) = match path {
        "/" => ("text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        "/bytes.html" => ("text/html; charset=utf-8", BYTES_PAGE.as_bytes().to_vec()),
        "/bytes" => ("application/octet-stream", bytes_body()),
        _ => return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    };
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A CA made for the test: `ca.pem`, `ca.key` (0600) in `dir`.
fn make_ca(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let ca = chatwall::tls_inspect::ca::generate("chatwall browser test CA", 30).expect("CA");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    std::fs::write(&cert, &ca.cert_pem).expect("write");
    std::fs::write(&key, &ca.key_pem).expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (cert, key)
}

/// Hosts Chromium asks for by itself whatever its flags say (the sign-in
/// account list, component and extension updates, network time), refused
/// by name so that nothing of it is looked up or leaves the machine.
const BACKGROUND: &str = r#"id = "browser-background"
name = "Chromium background requests"
category = "consumer-im"

[[hosts]]
names = ["google.com", "*.google.com", "*.googleapis.com", "*.gvt1.com", "*.gstatic.com"]
source = "requests headless Chromium 156 made through the proxy in this test"
"#;

/// The bundled signature set plus `BACKGROUND`, in `dir`/signatures.
fn signatures_dir(dir: &Path) -> PathBuf {
    let out = dir.join("signatures");
    std::fs::create_dir_all(&out).expect("signatures dir");
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("signatures");
    for entry in std::fs::read_dir(&bundled).expect("bundled signatures") {
        let path = entry.expect("entry").path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, out.join(name)).expect("copy signature file");
        }
    }
    std::fs::write(out.join("browser-background.toml"), BACKGROUND).expect("write");
    out
}

/// A proxy with the bundled signatures (and `BACKGROUND`) decrypting
/// `localhost` for loopback clients, trusting the origin's certificate
/// upstream; the CA's certificate.
async fn inspecting_proxy(dir: &Path, origin: &PageOrigin) -> (Proxy, PathBuf) {
    let (cert, key) = make_ca(dir);
    let toml = format!(
        "{}\n[signatures]\ndir = {:?}\n\n[tls_inspect]\nenabled = true\nca_cert = {:?}\nca_key = {:?}\nupstream_extra_ca = {:?}\nclients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]\n",
        support::OPEN,
        signatures_dir(dir).display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
        origin.cert_pem.display().to_string(),
    );
    (Proxy::start(&toml).await, cert)
}

/// Nothing the browser asked for left loopback: no record names an
/// upstream off it or a name lookup (the refused names are refused
/// before any).
fn assert_stayed_on_loopback(proxy: &Proxy) {
    for r in proxy.log() {
        let upstream = r["upstream"].as_str().unwrap_or("");
        assert!(
            upstream.is_empty() || upstream.starts_with("127.") || upstream.starts_with("[::1]"),
            "an upstream off loopback: {r}"
        );
        let error = r["error"].as_str().unwrap_or("");
        assert!(!error.contains("DNS"), "a name was looked up: {r}");
    }
}

/// Whether a program runs at all.
fn have(program: &str, arg: &str) -> bool {
    std::process::Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether the tests can run here; prints why not (or fails, when every
/// test is required).
fn browser_available() -> bool {
    if !have("chromium", "--version") {
        support::skip_or_fail("chromium is not installed (Debian package `chromium`)");
        return false;
    }
    if !have("certutil", "--help") {
        support::skip_or_fail("certutil is not installed (Debian package `libnss3-tools`)");
        return false;
    }
    true
}

/// A temporary HOME whose NSS database trusts `ca` to identify servers,
/// and a fresh Chromium profile in it.
struct BrowserHome {
    dir: tempfile::TempDir,
}

impl BrowserHome {
    fn new(ca: &Path) -> BrowserHome {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join(".pki").join("nssdb");
        std::fs::create_dir_all(&db).expect("nssdb dir");
        let db_arg = format!("sql:{}", db.display());
        let ca_arg = ca.display().to_string();
        for args in [
            vec!["-d", &db_arg, "-N", "--empty-password"],
            vec![
                "-d", &db_arg, "-A", "-t", "C,,", "-n", "chatwall", "-i", &ca_arg,
            ],
        ] {
            let out = std::process::Command::new("certutil")
                .args(&args)
                .env("HOME", dir.path())
                .stdin(Stdio::null())
                .output()
                .expect("certutil runs");
            assert!(
                out.status.success(),
                "certutil {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        BrowserHome { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What one browser run printed.
struct Run {
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    /// stderr without the noise of a machine that has no D-Bus, for
    /// failure messages.
    fn errors(&self) -> String {
        self.stderr
            .lines()
            .filter(|l| !l.contains("dbus") && !l.contains("unexpected operator"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Run headless Chromium through `proxy` with `home`'s NSS database, on
/// `url`, with `action` (`--dump-dom`, `--screenshot=...`). Bounded by
/// `BROWSER_LIMIT`: on time-out the browser's whole process group is killed.
async fn chromium(proxy: &Proxy, home: &BrowserHome, action: &str, url: &str) -> Run {
    let _one = BROWSER.lock().await;
    let profile = home.path().join("profile");
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // Debian's launcher loads its bundled extensions; the network time
        // service asks clients2.google.com. Whatever else Chromium asks
        // for by itself is refused by name (`BACKGROUND`).
        "--disable-extensions",
        "--disable-features=NetworkTimeServiceQuerying",
        "--window-size=800,600",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--proxy-server=http://{}", proxy.addr))
    // Chromium sends loopback names past the proxy unless told not to.
    .arg("--proxy-bypass-list=<-loopback>")
    .arg(action)
    .arg(url)
    .env("HOME", home.path())
    .env("XDG_CONFIG_HOME", home.path().join(".config"))
    .env("XDG_CACHE_HOME", home.path().join(".cache"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0)
    .kill_on_drop(true);
    let started = Instant::now();
    let child = cmd.spawn().expect("chromium starts");
    let pid = child.id();
    let out = tokio::time::timeout(BROWSER_LIMIT, child.wait_with_output()).await;
    // Whatever is left of the browser's processes (all in its group).
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let out = match out {
        Ok(out) => out.expect("chromium output"),
        Err(_) => panic!("chromium {action} {url} did not finish within {BROWSER_LIMIT:?}"),
    };
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        took: started.elapsed(),
    }
}

#[tokio::test]
async fn chromium_renders_an_allowed_page_through_a_decrypted_flow() {
    if !browser_available() {
        return;
    }
    let origin = PageOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, ca) = inspecting_proxy(dir.path(), &origin).await;
    let home = BrowserHome::new(&ca);
    let url = origin.url("/");
    let run = chromium(&proxy, &home, "--dump-dom", &url).await;
    assert_eq!(
        run.stdout.trim_end(),
        PAGE_DOM,
        "the page as served, parsed (stderr: {})",
        run.errors()
    );
    // The origin read Chromium's request in plaintext: it came out of a
    // flow chatwall decrypted, over chatwall's connection to the origin.
    let seen = origin.received();
    assert!(
        seen.starts_with("GET / HTTP/1.1\r\n"),
        "the origin read a plaintext GET: {seen:?}"
    );
    let host = format!("\r\nHost: localhost:{}\r\n", origin.addr.port());
    assert!(seen.contains(&host), "{seen:?}");
    assert!(
        seen.contains("HeadlessChrome/"),
        "Chromium's own request: {seen:?}"
    );
    let rec = proxy
        .wait_record(|r| r["tls"] == "inspected" && r["target"] == "/" && r["status"] == 200)
        .await;
    assert!(
        rec.is_some(),
        "the access log records an inspected GET /: {:?}",
        proxy.log()
    );
    assert!(
        origin.accepted.load(Ordering::SeqCst) >= 1,
        "the proxy connected to the origin"
    );
    eprintln!("chromium --dump-dom {url}: {:?}", run.took);
    assert_stayed_on_loopback(&proxy);
    proxy.stop().await;
}

#[tokio::test]
async fn chromium_receives_every_byte_value_through_a_decrypted_flow() {
    if !browser_available() {
        return;
    }
    let origin = PageOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, ca) = inspecting_proxy(dir.path(), &origin).await;
    let home = BrowserHome::new(&ca);
    let url = origin.url("/bytes.html");
    let run = chromium(&proxy, &home, "--dump-dom", &url).await;
    let shown = run
        .stdout
        .split_once("<p id=\"x\">")
        .and_then(|(_, rest)| rest.split_once("</p>"))
        .map(|(x, _)| x.to_string());
    let hex: String = bytes_body().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        shown.as_deref(),
        Some(format!("200 256 {hex}").as_str()),
        "the page's script read the body as the origin sent it: {:?} (stderr: {})",
        run.stdout,
        run.errors()
    );
    let lines = origin.request_lines();
    assert!(
        lines.iter().any(|l| l == "GET /bytes HTTP/1.1"),
        "the script's request came decrypted: {lines:?}"
    );
    assert!(
        proxy
            .wait_record(|r| r["tls"] == "inspected" && r["target"] == "/bytes")
            .await
            .is_some(),
        "{:?}",
        proxy.log()
    );
    eprintln!("chromium --dump-dom {url}: {:?}", run.took);
    assert_stayed_on_loopback(&proxy);
    proxy.stop().await;
}

#[tokio::test]
async fn chromium_shows_the_block_page_for_a_refused_name_without_an_interstitial() {
    if !browser_available() {
        return;
    }
    let origin = PageOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, ca) = inspecting_proxy(dir.path(), &origin).await;
    let home = BrowserHome::new(&ca);
    // Refused at CONNECT on its name, before any lookup: the proxy
    // answers 200 and serves the page over its own certificate for it.
    let url = "https://web.whatsapp.com/";
    let run = chromium(&proxy, &home, "--dump-dom", url).await;
    let dom = &run.stdout;
    assert!(
        dom.contains("<h1>Access refused</h1>") && dom.contains("<b>WhatsApp</b>"),
        "chatwall's block page, not a browser error page: {dom:?} (stderr: {})",
        run.errors()
    );
    assert!(dom.contains("<title>Blocked: WhatsApp</title>"), "{dom}");
    let rec = proxy
        .wait_record(|r| r["tls"] == "page" && r["verdict"] == "block" && r["app"] == "whatsapp")
        .await;
    assert!(
        rec.is_some(),
        "the access log records the block served as a page over TLS: {:?}",
        proxy.log()
    );
    assert_eq!(
        origin.accepted.load(Ordering::SeqCst),
        0,
        "nothing went to an origin"
    );
    eprintln!("chromium --dump-dom {url}: {:?}", run.took);
    assert_stayed_on_loopback(&proxy);
    proxy.stop().await;
}

#[tokio::test]
async fn chromium_shows_the_block_page_for_an_im_path_inside_an_allowed_https_host() {
    if !browser_available() {
        return;
    }
    let origin = PageOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, ca) = inspecting_proxy(dir.path(), &origin).await;
    let home = BrowserHome::new(&ca);
    // The Matrix client-server API path (signatures/matrix.toml) on any
    // host: seen only once the flow is decrypted.
    let url = origin.url("/_matrix/client/v3/sync");
    let run = chromium(&proxy, &home, "--dump-dom", &url).await;
    let dom = &run.stdout;
    assert!(
        dom.contains("<h1>Access refused</h1>") && dom.contains("<b>Matrix / Element</b>"),
        "chatwall's block page: {dom:?} (stderr: {})",
        run.errors()
    );
    // Chromium may go on to ask for /favicon.ico (naming the page in its
    // Referer): that passes, the refused path does not.
    let lines = origin.request_lines();
    assert!(
        !lines.iter().any(|l| l.contains("/_matrix/")),
        "the request never reached the origin: {lines:?}"
    );
    let rec = proxy
        .wait_record(|r| {
            r["verdict"] == "block"
                && r["app"] == "matrix"
                && r["tls"] == "inspected"
                && r["target"] == "/_matrix/client/v3/sync"
        })
        .await;
    assert!(
        rec.is_some(),
        "the access log records the block: {:?}",
        proxy.log()
    );
    eprintln!("chromium --dump-dom {url}: {:?}", run.took);
    assert_stayed_on_loopback(&proxy);
    proxy.stop().await;
}

#[tokio::test]
async fn chromium_screenshots_the_block_page() {
    if !browser_available() {
        return;
    }
    let origin = PageOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, ca) = inspecting_proxy(dir.path(), &origin).await;
    let home = BrowserHome::new(&ca);
    let shot = home.path().join("blocked.png");
    let run = chromium(
        &proxy,
        &home,
        &format!("--screenshot={}", shot.display()),
        "https://web.whatsapp.com/",
    )
    .await;
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot ({e}); stderr: {}", run.errors()));
    // The signature, then IHDR: width and height as the window was.
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "a PNG of {} bytes",
        png.len()
    );
    assert_eq!(
        (png.get(16..20), png.get(20..24)),
        (
            Some(&800u32.to_be_bytes()[..]),
            Some(&600u32.to_be_bytes()[..])
        ),
        "an 800x600 image"
    );
    assert!(
        proxy
            .wait_record(|r| r["tls"] == "page" && r["app"] == "whatsapp")
            .await
            .is_some(),
        "the page was served: {:?}",
        proxy.log()
    );
    assert_stayed_on_loopback(&proxy);
    proxy.stop().await;
}
