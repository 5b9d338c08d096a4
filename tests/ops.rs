//! Operations: live reload (good and bad sets, flows in progress), the PAC
//! file evaluated by a real JavaScript engine, and strict HTTP framing.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, connect_tunnel, read_response, HttpOrigin, Proxy, RawOrigin, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_policy_and_refuses_a_bad_one() {
    let origin = HttpOrigin::start().await;
    let proxy =
        Proxy::start("[access]\ndeny_destinations = []\n[policy]\ndefault = \"monitor\"\n").await;
    let base = std::fs::read_to_string(&proxy.config_path).expect("config");

    let req = "GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\nConnection: close\r\n\r\n".to_string();
    // Under monitor, a detected app is not refused (here DNS then fails: 502).
    assert_eq!(support::raw_http(proxy.addr, &req).await.0, 502);
    let mut kept = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("tunnel before reload");

    // A good new file: block.
    std::fs::write(
        &proxy.config_path,
        base.replace("default = \"monitor\"", "default = \"block\""),
    )
    .expect("write");
    let (status, body) = proxy.admin_post("/-/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        proxy.metric("chatwall_reloads_total{result=\"ok\"}").await,
        1.0
    );
    let (status, _) = support::raw_http(proxy.addr, &req).await;
    assert_eq!(status, 403);

    // A bad new file: refused, the old policy keeps serving.
    std::fs::write(
        &proxy.config_path,
        format!("{base}\n[policy.apps]\nno-such-app = \"allow\"\n"),
    )
    .expect("write");
    let (status, body) = proxy.admin_post("/-/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("no-such-app"), "{body}");
    assert_eq!(
        proxy
            .metric("chatwall_reloads_total{result=\"failed\"}")
            .await,
        1.0
    );
    let (status, _) = support::raw_http(proxy.addr, &req).await;
    assert_eq!(status, 403, "the old (blocking) policy must keep serving");
    std::fs::write(&proxy.config_path, "[listen\nbroken").expect("write");
    let (status, body) = proxy.admin_post("/-/reload").await;
    assert_eq!(status, 422);
    assert!(
        body.contains(":1:") || body.contains(":2:"),
        "file:line expected: {body}"
    );

    // The tunnel opened before the reloads still works.
    kept.write_all(b"GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut kept).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_in_progress_keep_their_verdict_across_a_reload() {
    let origin = RawOrigin::start(None, true).await;
    let proxy = Proxy::start("[access]\ndeny_destinations = []\n").await;
    let base = std::fs::read_to_string(&proxy.config_path).expect("config");
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(b"SSH-2.0-test\r\n").await.expect("write");
    let mut echo = [0u8; 14];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .expect("in time")
        .expect("echo");
    // Reload to a policy that would refuse new tunnels to this address.
    let dir = proxy.dir.path().join("sigs");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("loopback.toml"),
        "id = \"loopback\"\nname = \"Loopback test app\"\ncategory = \"consumer-im\"\n[[cidrs]]\nnets = [\"127.0.0.0/8\"]\nsource = \"test fixture\"\n",
    )
    .expect("write sig");
    std::fs::write(
        &proxy.config_path,
        format!(
            "{base}[signatures]\ndir = {:?}\n",
            dir.display().to_string()
        ),
    )
    .expect("write");
    let (status, body) = proxy.admin_post("/-/reload").await;
    assert_eq!(status, 200, "{body}");
    // Old tunnel: still relays.
    s.write_all(b"more bytes\r\n").await.expect("write");
    let mut echo = [0u8; 12];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&echo, b"more bytes\r\n");
    // New tunnel: refused by the new set.
    assert_eq!(
        connect_tunnel(proxy.addr, &origin.addr.to_string())
            .await
            .err(),
        Some(403)
    );
}

/// Evaluate `FindProxyForURL` with node for each (url, host).
fn eval_pac(pac: &str, cases: &[(&str, &str)]) -> Option<Vec<String>> {
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()?;
    if !node.status.success() {
        return None;
    }
    let calls: Vec<String> = cases
        .iter()
        .map(|(u, h)| format!("console.log(FindProxyForURL({u:?}, {h:?}));"))
        .collect();
    // The PAC helper functions, as browsers define them (no DNS: IP literals only).
    let script = format!(
        r#"
function isPlainHostName(h) {{ return h.indexOf('.') < 0; }}
function dnsDomainIs(h, d) {{ return h.length >= d.length && h.substring(h.length - d.length) == d; }}
function ip2n(ip) {{ var p = ip.split('.'); if (p.length != 4) return null; return ((+p[0] << 24) >>> 0) + (+p[1] << 16) + (+p[2] << 8) + (+p[3]); }}
function isInNet(h, net, mask) {{ var a = ip2n(h); if (a === null) return false; return ((a & ip2n(mask)) >>> 0) == ((ip2n(net) & ip2n(mask)) >>> 0); }}
{pac}
{}
"#,
        calls.join("\n")
    );
    let out = std::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pac_file_routes_internal_names_direct_and_the_rest_through_the_proxies() {
    let proxy = Proxy::start(
        "[pac]\nproxy = \"proxy-a.example.net:3128; proxy-b.example.net:3128\"\ndirect_networks = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\ndirect_domains = [\"intranet.example.com\"]\n",
    )
    .await;
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    let (status2, wpad) = proxy.admin_get("/wpad.dat").await;
    assert_eq!((status2, &wpad), (200, &pac));
    let cases = [
        ("http://www.example.org/", "www.example.org"),
        ("https://web.whatsapp.com/", "web.whatsapp.com"),
        ("http://intranet.example.com/", "intranet.example.com"),
        (
            "http://wiki.intranet.example.com/",
            "wiki.intranet.example.com",
        ),
        ("http://notintranet.example.com/", "notintranet.example.com"),
        ("http://10.1.2.3/", "10.1.2.3"),
        ("http://192.168.1.1/", "192.168.1.1"),
        ("http://172.16.0.1/", "172.16.0.1"),
        ("http://printer/", "printer"),
    ];
    let Some(got) = eval_pac(&pac, &cases) else {
        support::skip_or_fail("node is not installed; cannot evaluate the PAC file");
        return;
    };
    let both = "PROXY proxy-a.example.net:3128; PROXY proxy-b.example.net:3128";
    let want = [
        both, both, "DIRECT", "DIRECT", both, "DIRECT", "DIRECT", both, "DIRECT",
    ];
    assert_eq!(got, want, "{pac}");
    let (_, head) = raw_head(proxy.admin, "/proxy.pac").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-ns-proxy-autoconfig"),
        "{head}"
    );
}

async fn raw_head(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    (status, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_never_forwarded() {
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start_open().await;
    let o = origin.addr;
    let cases: Vec<(&str, String, u16)> = vec![
        ("TE not ending in chunked", format!("POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"), 400),
        ("two Content-Length", format!("POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"), 400),
        ("Content-Length +5", format!("POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: +5\r\n\r\nhello"), 400),
        ("Content-Length 0x5", format!("POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: 0x5\r\n\r\nhello"), 400),
        ("HTTP/1.0 with TE", format!("POST http://{o}/ HTTP/1.0\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
        ("space before colon", format!("GET http://{o}/ HTTP/1.1\r\nHost : {o}\r\n\r\n"), 400),
        ("obs-fold", format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nX-A: a\r\n b\r\n\r\n"), 400),
        ("NUL in a value", format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nX-A: a\0b\r\n\r\n"), 400),
        ("two spaces in the request line", format!("GET  http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n"), 400),
        ("bad version", format!("GET http://{o}/ HTTP/1.1x\r\nHost: {o}\r\n\r\n"), 400),
        ("two Host fields", format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nHost: other.example\r\n\r\n"), 400),
        ("bad chunk size", format!("POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"), 400),
        ("chunk size overflow", format!("POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"), 400),
    ];
    for (name, req, want) in &cases {
        let out = support::raw_exchange(proxy.addr, req.as_bytes()).await;
        let (status, _) = support::parse_response(&out);
        // A body whose framing fails mid-way may end without a response.
        assert!(
            status == *want || (status == 0 && name.contains("chunk")),
            "{name}: got {status}: {}",
            String::from_utf8_lossy(&out)
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = origin.requests();
    assert!(
        seen.iter().all(|r| r.body_len == 0 || r.uri == "/echo"),
        "an ambiguous request reached the origin: {seen:?}"
    );
    assert!(
        seen.iter().all(|r| r.uri != "/"),
        "an ambiguous request reached the origin: {seen:?}"
    );

    // Content-Length with Transfer-Encoding: chunked framing wins, the
    // Content-Length is dropped, and the client connection is closed after
    // the response (RFC 9112 §6.3), so nothing can be smuggled behind it.
    let req = format!("POST http://{o}/cl-te HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://{o}/smuggled HTTP/1.1\r\nHost: {o}\r\n\r\n");
    let out = support::raw_exchange(proxy.addr, req.as_bytes()).await;
    assert_eq!(support::parse_response(&out).0, 200);
    let seen = origin.requests();
    let cl_te: Vec<_> = seen.iter().filter(|r| r.uri == "/cl-te").collect();
    assert_eq!(cl_te.len(), 1);
    assert_eq!(cl_te[0].body_len, 0);
    assert!(
        seen.iter().all(|r| r.uri != "/smuggled"),
        "a request after CL+TE was served: {seen:?}"
    );
}

fn basic(creds: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(creds)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authentication_asks_checks_and_never_forwards_credentials() {
    let origin = HttpOrigin::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let line = chatwall::auth::hash_line("alice", "correct horse").expect("hash");
    std::fs::write(&users, format!("# users\n{line}\n")).expect("write users");
    // A per-user exception: alice may use the loopback test app.
    let sigs = dir.path().join("sigs");
    std::fs::create_dir_all(&sigs).expect("mkdir");
    std::fs::write(
        sigs.join("loopback.toml"),
        "id = \"loopback\"\nname = \"Loopback\"\ncategory = \"consumer-im\"\n[[hosts]]\nnames = [\"localhost\"]\nsource = \"test fixture\"\n",
    )
    .expect("write sig");
    let proxy = Proxy::start(&format!(
        "[access]\ndeny_destinations = []\n[auth]\nusers_file = {:?}\nrealm = \"corp\"\n[signatures]\ndir = {:?}\n[[policy.exceptions]]\nusers = [\"alice\"]\napps = [\"loopback\"]\naction = \"allow\"\n",
        users.display().to_string(),
        sigs.display().to_string()
    ))
    .await;
    let o = origin.addr;
    let get = |auth: Option<String>, host: String| {
        let extra = auth
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    };
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(get(None, o.to_string()).as_bytes())
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 407);
    assert!(
        head.to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm=\"corp\""),
        "{head}"
    );
    let (status, _) =
        support::raw_http(proxy.addr, &get(Some(basic("alice:wrong")), o.to_string())).await;
    assert_eq!(status, 407);
    let (status, _) = support::raw_http(
        proxy.addr,
        &get(Some(basic("mallory:correct horse")), o.to_string()),
    )
    .await;
    assert_eq!(status, 407);
    assert_eq!(origin.requests().len(), 0);
    let (status, body) = support::raw_http(
        proxy.addr,
        &get(Some(basic("alice:correct horse")), o.to_string()),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "hello from origin\n"));
    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0]
            .headers
            .iter()
            .all(|(k, _)| k != "proxy-authorization"),
        "{seen:?}"
    );
    // The exception names alice: `localhost` (the test app) passes for her.
    let local = format!("localhost:{}", o.port());
    let (status, _) = support::raw_http(
        proxy.addr,
        &get(Some(basic("alice:correct horse")), local.clone()),
    )
    .await;
    assert_eq!(status, 200);
    // CONNECT needs credentials too.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.0, 407);
    let log = proxy.wait_log(6).await;
    let users: Vec<_> = log.iter().map(|r| r["user"].clone()).collect();
    assert_eq!(users[3], "alice", "{log:?}");
    assert_eq!(proxy.metric("chatwall_auth_failures_total").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_already_came_through_this_proxy_is_a_loop() {
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start_open().await;
    let o = origin.addr;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    let via = head
        .lines()
        .find_map(|l| l.strip_prefix("via: ").or_else(|| l.strip_prefix("Via: ")))
        .expect("a Via field")
        .trim()
        .to_string();
    assert!(via.starts_with("1.1 chatwall-"), "{via}");
    // Another chatwall in a chain is not a loop; this one is.
    let req = |v: &str| {
        format!(
            "GET http://{o}/again HTTP/1.1\r\nHost: {o}\r\nVia: {v}\r\nConnection: close\r\n\r\n"
        )
    };
    assert_eq!(
        support::raw_http(proxy.addr, &req("1.1 chatwall-000000"))
            .await
            .0,
        200
    );
    assert_eq!(
        support::raw_http(proxy.addr, &req(&format!("1.0 other, {via}")))
            .await
            .0,
        508
    );
    assert_eq!(origin.requests().len(), 2);
}
