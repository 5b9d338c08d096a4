//! Installer digests (`[[downloads]] sha256`) on responses that pass
//! through the HTTP follower of tunnels: a listed body is cut off before
//! its last 64 KiB and the same URL is refused with the page on the next
//! try; an unlisted one arrives byte for byte. The signature set is a
//! directory made for the test, whose one app lists the digest of a body
//! the test builds.
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use crate::support::{self, connect_tunnel, read_to_close, Ending, Proxy, Script, ScriptOrigin};

/// The hold-back of the proxy: a cut-off body misses at least this much.
const HOLD_BACK: usize = 64 * 1024;

fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn response(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-msdownload\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A proxy whose signature set is one app listing `digest`.
async fn proxy_listing(digest: &[u8]) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sigs = dir.path().join("signatures");
    std::fs::create_dir(&sigs).expect("mkdir");
    std::fs::write(
        sigs.join("testim.toml"),
        format!(
            "id = \"testim\"\nname = \"Test IM\"\ncategory = \"consumer-im\"\n\n[[downloads]]\nsha256 = [\"{}\"]\nsource = \"the test's own installer body\"\n",
            hex(digest)
        ),
    )
    .expect("write");
    let toml = format!(
        "{}\n[signatures]\ndir = {:?}\n",
        support::OPEN,
        sigs.display().to_string()
    );
    (Proxy::start(&toml).await, dir)
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

async fn get(proxy: &Proxy, origin: &ScriptOrigin, path: &str) -> (Vec<u8>, Ending) {
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&request(path)).await.expect("write");
    read_to_close(&mut s).await
}

#[tokio::test]
async fn a_listed_installer_is_cut_off_and_refused_on_retry() {
    let listed = body(1024 * 1024 + 123, 7);
    let digest = sha2::Sha256::digest(&listed);
    let origin = ScriptOrigin::start(Script::http(vec![response(&listed)])).await;
    let (proxy, _sigs) = proxy_listing(&digest).await;

    let (got, ending) = get(&proxy, &origin, "/dl/setup.exe").await;
    let full = response(&listed);
    // The reset may discard what was still in flight to the client; the
    // last 64 KiB never left the proxy.
    assert!(
        got.len() <= full.len() - HOLD_BACK,
        "cut off before its last 64 KiB: got {} of {}",
        got.len(),
        full.len()
    );
    assert_eq!(
        &got[..],
        &full[..got.len()],
        "what passed is the server's bytes"
    );
    assert_eq!(ending, Ending::Reset, "the tunnel is reset");
    let recs = proxy.wait_log(1).await;
    assert!(
        recs.iter()
            .any(|r| r["verdict"] == "block" && r["app"] == "testim" && r["reason"] == "download"),
        "{recs:?}"
    );

    // The same URL again: the page, and the origin sees no new request.
    let before = origin.requests();
    let (got, _) = get(&proxy, &origin, "/dl/setup.exe").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-chatwall-block: testim"),
        "{text}"
    );
    assert_eq!(
        origin.requests(),
        before,
        "the retry never reached the origin"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_unlisted_download_arrives_byte_exact() {
    let listed = body(300 * 1024, 1);
    let other = body(300 * 1024 + 5, 2);
    let origin = ScriptOrigin::start(Script::http(vec![response(&other)])).await;
    let (proxy, _sigs) = proxy_listing(&sha2::Sha256::digest(&listed)).await;
    let (got, _) = get(&proxy, &origin, "/dl/other.exe").await;
    support::assert_same_bytes("client received", &got, &response(&other));
    support::assert_same_bytes(
        "origin received",
        &origin.received(0),
        &request("/dl/other.exe"),
    );
    assert_eq!(origin.accepted(), 1, "one upstream connection");
    proxy.stop().await;
}

#[tokio::test]
async fn a_small_listed_body_is_held_whole_and_cut() {
    // Shorter than the hold-back: nothing of its body passes.
    let listed = body(10_000, 3);
    let origin = ScriptOrigin::start(Script::http(vec![response(&listed)])).await;
    let (proxy, _sigs) = proxy_listing(&sha2::Sha256::digest(&listed)).await;
    let (got, ending) = get(&proxy, &origin, "/x.msi").await;
    let full = response(&listed);
    let head_len = full.len() - listed.len();
    assert_eq!(
        got.len(),
        head_len,
        "only the head passed: {}",
        support::escape(&got)
    );
    assert_eq!(ending, Ending::Reset);
    proxy.stop().await;
}

/// An absolute-form GET through the proxy's HTTP server.
async fn explicit_get(proxy: &Proxy, origin: &ScriptOrigin, path: &str) -> (Vec<u8>, Ending) {
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect proxy");
    let port = origin.addr.port();
    s.write_all(
        format!("GET http://localhost:{port}{path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    read_to_close(&mut s).await
}

#[tokio::test]
async fn explicit_http_downloads_are_hashed_too() {
    let listed = body(512 * 1024 + 9, 5);
    let origin = ScriptOrigin::start(Script::http(vec![response(&listed)])).await;
    let (proxy, _sigs) = proxy_listing(&sha2::Sha256::digest(&listed)).await;
    let (got, ending) = explicit_get(&proxy, &origin, "/get/setup.exe").await;
    let body_start = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .expect("a response head");
    let head = String::from_utf8_lossy(&got[..body_start]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body_got = &got[body_start..];
    assert!(
        body_got.len() <= listed.len() - HOLD_BACK,
        "cut off before its last 64 KiB: {} of {} ({ending:?})",
        body_got.len(),
        listed.len()
    );
    assert_eq!(
        body_got,
        &listed[..body_got.len()],
        "what passed is the server's bytes"
    );
    let before = origin.requests();
    let (got, _) = explicit_get(&proxy, &origin, "/get/setup.exe").await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-chatwall-block: testim"),
        "{text}"
    );
    assert_eq!(
        origin.requests(),
        before,
        "the retry never reached the origin"
    );

    // Another body on another URL passes whole.
    let other = body(200 * 1024, 9);
    let origin2 = ScriptOrigin::start(Script::http(vec![response(&other)])).await;
    let (got, _) = explicit_get(&proxy, &origin2, "/get/other.exe").await;
    let start = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .expect("head");
    support::assert_same_bytes("explicit body", &got[start..], &other);
    assert_eq!(origin2.accepted(), 1, "one upstream connection");
    // A forward proxy's rewrite only: origin-form, the same host.
    let seen = origin2.received(0);
    assert!(
        seen.starts_with(b"GET /get/other.exe HTTP/1.1\r\n"),
        "{}",
        support::escape(&seen)
    );
    proxy.stop().await;
}
