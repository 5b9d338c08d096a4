//! The closed admin surface: `[admin] allow` keeps `/metrics` and
//! `POST /-/reload` to its clients, health, readiness and the PAC file stay
//! open; an optional bearer token for the reload; the PAC file also on the
//! explicit proxy port (origin-form GET and HEAD, without credentials).
use std::os::unix::fs::PermissionsExt;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{self, raw_http, read_response, Proxy};

/// `[admin] allow` without loopback: the tests' client (127.0.0.1) is
/// outside it.
const ELSEWHERE: &str =
    "[admin]\nallow = [\"10.0.0.0/8\"]\n[pac]\nproxy = \"proxy.example.net:3128\"\n";

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: proxy.example.net\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_admin_allow_gets_the_pac_file_but_403_for_metrics_and_reload() {
    let proxy = Proxy::start(ELSEWHERE).await;
    let (status, body) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("chatwall_"), "{body}");
    let (status, _) = proxy.admin_post("/-/reload").await;
    assert_eq!(status, 403);
    assert_eq!(proxy.shared.metrics.reloads_ok.get(), 0, "no reload ran");
    // Unknown paths do not tell an outsider more.
    assert_eq!(proxy.admin_get("/nothing").await.0, 403);
    // Probes and browsers still get what they need.
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    let (status, admin_pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    assert!(admin_pac.contains("FindProxyForURL"), "{admin_pac}");
    assert!(
        admin_pac.contains("PROXY proxy.example.net:3128"),
        "{admin_pac}"
    );
    assert_eq!(proxy.admin_get("/wpad.dat").await, (200, admin_pac.clone()));
    // The proxy port serves the same file.
    for path in ["/proxy.pac", "/wpad.dat", "/proxy.pac?v=2"] {
        let (status, body) = raw_http(proxy.addr, &get(path)).await;
        assert_eq!((status, &body), (200, &admin_pac), "{path}");
    }
    let text = proxy.shared.metrics.render();
    let refused = support::metric_value(&text, "chatwall_admin_refusals_total{reason=\"client\"}");
    assert_eq!(refused, 3.0, "{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_the_pac_file_from_the_proxy_port() {
    if !support::have_curl() {
        support::skip_or_fail("curl is not installed");
        return;
    }
    let proxy = Proxy::start(ELSEWHERE).await;
    let url = format!("http://{}/proxy.pac", proxy.addr);
    let (code, body, err) = support::curl(&["-f", "-D", "-", &url]).await;
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8_lossy(&body).into_owned();
    let (head, pac) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-ns-proxy-autoconfig"),
        "{head}"
    );
    assert!(pac.starts_with("function FindProxyForURL"), "{pac}");
    assert!(pac.contains("PROXY proxy.example.net:3128"), "{pac}");
    // HEAD: the head alone.
    let (code, body, err) = support::curl(&["-f", "-I", &url]).await;
    assert_eq!(code, 0, "{err}");
    let head = String::from_utf8_lossy(&body).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.contains("FindProxyForURL"), "{head}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origin_form_requests_on_the_proxy_port_stay_400() {
    let proxy = Proxy::start(ELSEWHERE).await;
    for req in [
        get("/"),
        get("/proxy.pac.bak"),
        get("/metrics"),
        "POST /proxy.pac HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string(),
    ] {
        let (status, body) = raw_http(proxy.addr, &req).await;
        assert_eq!(status, 400, "{req}: {body}");
        assert!(!body.contains("FindProxyForURL"), "{req}");
    }
    // An absolute-form request for /proxy.pac is a proxy request like any
    // other: here to a destination that is never reached.
    let (status, body) = raw_http(
        proxy.addr,
        "GET http://127.0.0.1:9/proxy.pac HTTP/1.1\r\nHost: 127.0.0.1:9\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("FindProxyForURL"), "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pac_file_needs_no_proxy_credentials_and_keeps_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let line = chatwall::auth::hash_line("alice", "correct horse").expect("hash");
    std::fs::write(&users, format!("{line}\n")).expect("write users");
    let proxy = Proxy::start(&format!(
        "{ELSEWHERE}[auth]\nusers_file = {:?}\n",
        users.display().to_string()
    ))
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    // Two PAC fetches on one connection, then a proxy request without
    // credentials: 407 as before.
    for _ in 0..2 {
        s.write_all(b"GET /wpad.dat HTTP/1.1\r\nHost: wpad\r\n\r\n")
            .await
            .expect("write");
        let (status, _head, body) = read_response(&mut s).await;
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains("FindProxyForURL"));
    }
    s.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.0, 407);
    // Any other origin-form request needs credentials first, like every
    // request.
    assert_eq!(raw_http(proxy.addr, &get("/")).await.0, 407);
    proxy.stop().await;
}

fn reload(token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    format!("POST /-/reload HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_needs_the_bearer_token_when_one_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_path = dir.path().join("reload.token");
    let token = "s3cr3t-reload-token-0123456789";
    std::fs::write(&token_path, format!("{token}\n")).expect("write token");
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let proxy = Proxy::start(&format!(
        "[admin]\nreload_token_file = {:?}\n",
        token_path.display().to_string()
    ))
    .await;
    // Loopback is in the default admin.allow: metrics need no token.
    let (status, metrics) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("chatwall_build_info"));

    let out = support::raw_exchange(proxy.admin, reload(None).as_bytes()).await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 401"), "{text}");
    assert!(
        text.contains("www-authenticate: bearer realm=\"chatwall admin\""),
        "{text}"
    );
    for wrong in [
        "Bearer s3cr3t-reload-token-012345678",
        "Bearer s3cr3t-reload-token-01234567890",
        "Bearer S3CR3T-RELOAD-TOKEN-0123456789",
        "Basic czNjcjN0LXJlbG9hZC10b2tlbi0wMTIzNDU2Nzg5",
        "s3cr3t-reload-token-0123456789",
    ] {
        let (status, _) = raw_http(proxy.admin, &reload(Some(wrong))).await;
        assert_eq!(status, 403, "{wrong}");
    }
    assert_eq!(proxy.shared.metrics.reloads_ok.get(), 0, "no reload ran");
    let (status, body) = raw_http(proxy.admin, &reload(Some(&format!("Bearer {token}")))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("reloaded"), "{body}");
    // The scheme's name in any case.
    let (status, _) = raw_http(proxy.admin, &reload(Some(&format!("bearer {token}")))).await;
    assert_eq!(status, 200);
    assert_eq!(proxy.shared.metrics.reloads_ok.get(), 2);
    assert_eq!(
        proxy
            .metric("chatwall_admin_refusals_total{reason=\"token\"}")
            .await,
        6.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_admin_allow_takes_effect_on_reload() {
    let proxy = Proxy::start("").await;
    assert_eq!(proxy.admin_get("/metrics").await.0, 200);
    let text = std::fs::read_to_string(&proxy.config_path).expect("read config");
    std::fs::write(
        &proxy.config_path,
        format!("{text}\n[admin]\nallow = [\"10.0.0.0/8\"]\n"),
    )
    .expect("write config");
    assert_eq!(proxy.admin_post("/-/reload").await.0, 200);
    assert_eq!(proxy.admin_get("/metrics").await.0, 403);
    assert_eq!(proxy.admin_post("/-/reload").await.0, 403);
    assert_eq!(proxy.admin_get("/proxy.pac").await.0, 200);
    proxy.stop().await;
}
