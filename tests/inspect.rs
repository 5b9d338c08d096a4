//! Inspection of what flows through tunnels and plain HTTP: ClientHellos
//! (split across reads and records, delayed, upper case, ECH), IM protocols
//! inside CONNECT, IM tunnelled over HTTP (gateway paths, BOSH bodies,
//! WebSocket subprotocols), and ordinary protocols that must pass
//! byte-exact.
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, connect_tunnel, read_response, Proxy, RawOrigin, WAIT};

/// A ClientHello record built field by field (RFC 8446 §4.1.2).
fn client_hello(sni: &str, alpn: &[&str], extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut exts: Vec<u8> = Vec::new();
    let mut push_ext = |ty: u16, body: &[u8]| {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&(body.len() as u16).to_be_bytes());
        exts.extend_from_slice(body);
    };
    // server_name (RFC 6066 §3): list length, type host_name (0), name.
    let mut sn = Vec::new();
    sn.extend_from_slice(&((sni.len() + 3) as u16).to_be_bytes());
    sn.push(0);
    sn.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    sn.extend_from_slice(sni.as_bytes());
    push_ext(0x0000, &sn);
    // supported_groups: x25519.
    push_ext(0x000a, &[0x00, 0x02, 0x00, 0x1d]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256.
    push_ext(0x000d, &[0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for a in alpn {
            list.push(a.len() as u8);
            list.extend_from_slice(a.as_bytes());
        }
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&list);
        push_ext(0x0010, &body);
    }
    // supported_versions: TLS 1.3, 1.2.
    push_ext(0x002b, &[0x04, 0x03, 0x04, 0x03, 0x03]);
    for (ty, body) in extra {
        push_ext(*ty, body);
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&[0x03, 0x03]); // legacy_version TLS 1.2
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(32); // legacy_session_id
    hello.extend_from_slice(&[0x11; 32]);
    hello.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]); // cipher_suites
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    records(&hs, hs.len())
}

/// Frame a handshake message into TLS records of at most `max` bytes.
fn records(hs: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in hs.chunks(max) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The handshake message inside a single-record hello.
fn handshake_of(record: &[u8]) -> Vec<u8> {
    record[5..].to_vec()
}

/// Send `data` in pieces of `step` bytes with `pause` between them.
async fn send_split(s: &mut TcpStream, data: &[u8], step: usize, pause: Duration) {
    for chunk in data.chunks(step) {
        if s.write_all(chunk).await.is_err() {
            return;
        }
        let _ = s.flush().await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Did the proxy end the tunnel (reset or close) without data?
async fn is_refused(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

const FAST: &str = "[access]\ndeny_destinations = []\n[inspect]\nclient_bytes = 16384\nfirst_bytes_timeout_ms = 1500\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_sni_inside_an_allowed_tunnel_is_reset_before_the_upstream_sees_a_byte() {
    let origin = RawOrigin::start(None, true).await;
    let proxy = Proxy::start(FAST).await;
    let hello = client_hello("web.whatsapp.com", &["h2", "http/1.1"], &[]);
    let upper = client_hello("WEB.WHATSAPP.COM", &["h2"], &[]);
    let fragmented = records(&handshake_of(&hello), 40);
    let cases: Vec<(&str, Vec<u8>, usize, Duration)> = vec![
        ("one write", hello.clone(), usize::MAX, Duration::ZERO),
        (
            "one byte per write",
            hello.clone(),
            1,
            Duration::from_millis(1),
        ),
        ("lone 0x16 first", hello.clone(), 1, Duration::ZERO),
        ("split across TLS records", fragmented, 7, Duration::ZERO),
        (
            "delayed past half the timeout",
            hello.clone(),
            hello.len() / 2 + 1,
            Duration::from_millis(900),
        ),
        ("upper-case SNI", upper, usize::MAX, Duration::ZERO),
    ];
    for (name, bytes, step, pause) in cases {
        let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
            .await
            .unwrap_or_else(|st| panic!("{name}: CONNECT got {st}"));
        send_split(&mut s, &bytes, step.min(bytes.len()), pause).await;
        assert!(is_refused(&mut s).await, "{name}: tunnel not refused");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        origin.total_received(),
        0,
        "the upstream received bytes of a refused tunnel"
    );
    let log = proxy.wait_log(6).await;
    let blocks: Vec<_> = log.iter().filter(|r| r["verdict"] == "block").collect();
    assert_eq!(blocks.len(), 6, "{log:?}");
    for r in blocks {
        assert_eq!(r["app"], "whatsapp");
        assert_eq!(r["reason"], "sni");
        assert!(
            r["ja4"].as_str().is_some_and(|j| j.starts_with("t13d")),
            "{r}"
        );
    }
    assert_eq!(
        proxy
            .metric("chatwall_blocked_total{app=\"whatsapp\",reason=\"sni\"}")
            .await,
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_client_hellos_pass_byte_exact_including_large_post_quantum_ones() {
    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start(FAST).await;
    // A key_share as large as X25519MLKEM768's (1216 bytes) pushes the hello
    // past one TCP segment.
    let mut ks = Vec::new();
    let share_len = 1216u16;
    ks.extend_from_slice(&(share_len + 4).to_be_bytes());
    ks.extend_from_slice(&[0x11, 0xec]);
    ks.extend_from_slice(&share_len.to_be_bytes());
    ks.extend(std::iter::repeat_n(0x42, share_len as usize));
    // padding (RFC 7685) as browsers add it.
    let big = client_hello(
        "www.example.org",
        &["h2"],
        &[(0x0033, ks), (0x0015, vec![0; 300])],
    );
    assert!(big.len() > 1460, "{}", big.len());
    let small = client_hello("localhost", &["http/1.1"], &[]);
    let mut expected = Vec::new();
    for (bytes, step) in [(&big, 700usize), (&small, 3)] {
        let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
            .await
            .expect("CONNECT");
        send_split(&mut s, bytes, step, Duration::ZERO).await;
        s.write_all(b"after the hello").await.expect("write");
        expected.push([bytes.as_slice(), b"after the hello"].concat());
        // Keep the tunnel open until the origin saw everything.
        for _ in 0..200 {
            if origin
                .received
                .lock()
                .map(|r| r.last().map(Vec::len))
                .ok()
                .flatten()
                == Some(expected.last().map(Vec::len).unwrap_or(0))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(
            &origin.connection_bytes(i),
            want,
            "tunnel {i} not byte-exact"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ech_is_refused_when_policy_blocks_it_and_passes_when_monitored() {
    let origin = RawOrigin::start(None, false).await;
    let ech_ext = (
        0xfe0du16,
        vec![0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00],
    );
    let hello = client_hello("public.example.net", &["h2"], &[ech_ext]);

    let proxy = Proxy::start(&format!("{FAST}[policy]\nech = \"block\"\n")).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&hello).await.expect("write");
    assert!(is_refused(&mut s).await);
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["reason"], "ech", "{log:?}");
    assert_eq!(origin.total_received(), 0);

    let proxy = Proxy::start(FAST).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&hello).await.expect("write");
    drop(s);
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["verdict"], "monitor", "{log:?}");
    assert_eq!(log[0]["reason"], "ech");
}

/// First client bytes of IM protocols, built from their specifications.
fn im_first_bytes() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut oscar = vec![0x2a, 0x01, 0x12, 0x34, 0x00, 0x0c]; // FLAP: '*', channel 1 (sign-on), seq, len 12
    oscar.extend_from_slice(&[0x00, 0x00, 0x00, 0x01]); // FLAP version 1
    oscar.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]); // TLV 6: login cookie
    let mut ymsg = b"YMSG".to_vec(); // YMSG header, 20 bytes (Wireshark packet-ymsg.c)
    ymsg.extend_from_slice(&[0x00, 0x10, 0x00, 0x00]); // version 16, vendor 0
    ymsg.extend_from_slice(&[0x00, 0x0a, 0x00, 0x57]); // payload length 10, service 0x57 (auth)
    ymsg.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // status, session
    ymsg.extend_from_slice(b"1\xc0\x80alice\xc0\x80");
    vec![
        ("aim", "OSCAR FLAP sign-on", oscar),
        ("yahoo-messenger", "YMSG auth", ymsg),
        ("msn-messenger", "MSNP VER", b"VER 1 MSNP15 MSNP14 MSNP13 CVR0\r\n".to_vec()),
        (
            "xmpp",
            "XMPP stream with prolog, single quotes",
            b"<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>".to_vec(),
        ),
        (
            "xmpp",
            "XMPP stream without prolog, double quotes",
            b"<stream:stream xmlns=\"jabber:client\" to=\"example.com\" version=\"1.0\" xmlns:stream=\"http://etherx.jabber.org/streams\">".to_vec(),
        ),
        ("whatsapp", "WhatsApp Noise prologue", vec![0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24, 0x12, 0x22]),
        ("telegram", "MTProto intermediate", vec![0xee, 0xee, 0xee, 0xee, 0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("irc", "IRC registration", b"NICK alice\r\nUSER alice 0 * :Alice\r\n".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_protocols_inside_connect_are_reset_on_any_port() {
    let proxy = Proxy::start(FAST).await;
    let cases = im_first_bytes();
    for (app, name, bytes) in &cases {
        // Whole, and split into 3-byte writes (a signature split across reads).
        for step in [bytes.len(), 3] {
            let origin = RawOrigin::start(None, false).await;
            let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
                .await
                .expect("CONNECT");
            send_split(&mut s, bytes, step, Duration::from_millis(2)).await;
            assert!(is_refused(&mut s).await, "{name} (step {step}) not refused");
            let log = proxy.wait_log(1).await;
            let last = log.last().cloned().unwrap_or_default();
            assert_eq!(last["app"], *app, "{name}: {last}");
            assert_eq!(last["reason"], "payload", "{name}: {last}");
            assert!(
                last["rule"].as_str().is_some(),
                "{name}: evidence missing: {last}"
            );
            std::fs::write(&proxy.log_path, b"").expect("truncate log");
            tokio::time::sleep(Duration::from_millis(20)).await;
            if step == bytes.len() {
                assert_eq!(
                    origin.total_received(),
                    0,
                    "{name}: IM bytes reached the upstream"
                );
            } else {
                // Bytes that cannot start a signature may pass before the
                // signature completes; the signature itself never does.
                assert!(
                    origin.total_received() < bytes.len(),
                    "{name}: the whole message reached the upstream"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_after_a_benign_prefix_within_the_window_is_reset() {
    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start(FAST).await;
    // In one write: nothing reaches the upstream.
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(b"hello there, just some text\r\n<stream:stream xmlns='jabber:client' to='x'>")
        .await
        .expect("write");
    assert!(is_refused(&mut s).await);
    assert_eq!(origin.total_received(), 0);
    // In two writes: the benign prefix may pass, the tunnel is reset when
    // the signature arrives.
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(b"hello there, just some text\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"<stream:stream xmlns='jabber:client' to='x'>")
        .await
        .expect("write");
    assert!(is_refused(&mut s).await);
    let log = proxy.wait_log(2).await;
    assert!(log.iter().all(|r| r["app"] == "xmpp"), "{log:?}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!String::from_utf8_lossy(&origin.connection_bytes(1)).contains("stream:stream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_protocols_pass_byte_exact() {
    let origin = RawOrigin::start(None, true).await;
    // A long inspection deadline: an ordinary protocol must never wait for it.
    let proxy = Proxy::start(
        "[access]\ndeny_destinations = []\n[inspect]\nfirst_bytes_timeout_ms = 8000\n",
    )
    .await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "ssh",
            b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n".to_vec(),
        ),
        (
            "smtp",
            b"EHLO mail.example.com\r\nMAIL FROM:<a@example.com>\r\n".to_vec(),
        ),
        (
            "imap",
            b"a001 LOGIN user pass\r\na002 SELECT INBOX\r\n".to_vec(),
        ),
        ("ftp", b"USER anonymous\r\n".to_vec()),
        ("pop3", b"USER alice\r\n".to_vec()),
        ("redis", b"*1\r\n$4\r\nPING\r\n".to_vec()),
        (
            "mysql",
            vec![
                0x20, 0x00, 0x00, 0x01, 0x85, 0xa6, 0xff, 0x01, 0x00, 0x00, 0x00, 0x01, 0x21, 0x00,
                0x00, 0x00,
            ],
        ),
        (
            "postgres",
            vec![0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f],
        ),
        (
            "random",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
    ];
    for (name, bytes) in &cases {
        let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
            .await
            .expect("CONNECT");
        s.write_all(bytes).await.expect("write");
        let mut echoed = vec![0u8; bytes.len()];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("{name}: stalled"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&echoed, bytes, "{name} not byte-exact");
    }
    let log = proxy.log();
    assert!(log.iter().all(|r| r["verdict"] != "block"), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_protocols_work_through_tunnels() {
    let origin = RawOrigin::start(Some(b"220 mail.example.com ESMTP ready\r\n"), true).await;
    let proxy = Proxy::start(FAST).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    let mut banner = [0u8; 34];
    tokio::time::timeout(WAIT, s.read_exact(&mut banner))
        .await
        .expect("banner in time")
        .expect("banner");
    assert_eq!(&banner, b"220 mail.example.com ESMTP ready\r\n");
    // The client's first bytes are still inspected when they come.
    s.write_all(b"EHLO client\r\n").await.expect("write");
    let mut echo = [0u8; 13];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"EHLO client\r\n");
    s.write_all(b"<stream:stream xmlns='jabber:client'>")
        .await
        .expect("write");
    assert!(
        is_refused(&mut s).await,
        "IM after a server banner must still be caught"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gadu_gadu_server_welcome_is_caught_server_side() {
    let origin = RawOrigin::start(
        Some(&[0x01, 0, 0, 0, 0x04, 0, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd]),
        false,
    )
    .await;
    let proxy = Proxy::start(FAST).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    assert!(is_refused(&mut s).await, "GG welcome not refused");
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["app"], "gadu-gadu", "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_monitor_mode_passes_and_logs() {
    let origin = RawOrigin::start(None, true).await;
    let proxy = Proxy::start(&format!("{FAST}[policy]\ndefault = \"monitor\"\n")).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    let xmpp = b"<stream:stream xmlns='jabber:client' to='x'>";
    s.write_all(xmpp).await.expect("write");
    let mut echo = vec![0u8; xmpp.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&echo[..], &xmpp[..]);
    drop(s);
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["verdict"], "monitor", "{log:?}");
    assert_eq!(log[0]["app"], "xmpp");
    assert_eq!(
        proxy
            .metric("chatwall_detections_total{action=\"monitor\",app=\"xmpp\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("chatwall_blocked_total{app=\"xmpp\",reason=\"payload\"}")
            .await,
        0.0
    );
}

/// An RFC 8656 Allocate request (RFC 8489 §5 header: type 0x0003, length,
/// magic cookie 0x2112A442, transaction id) with REQUESTED-TRANSPORT UDP.
fn turn_allocate() -> Vec<u8> {
    let mut m = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&[0x4b; 12]); // transaction id
    m.extend_from_slice(&[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]); // REQUESTED-TRANSPORT
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_over_tcp_is_monitored_and_microsoft_turn_is_refused() {
    let origin = RawOrigin::start(None, true).await;
    let proxy = Proxy::start(FAST).await;
    // Category media-relay is monitored by default: the bytes pass.
    let allocate = turn_allocate();
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&allocate).await.expect("write");
    let mut echo = vec![0u8; allocate.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut echo))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(echo, allocate);
    drop(s);
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["app"], "stun-turn", "{log:?}");
    assert_eq!(log[0]["verdict"], "monitor", "{log:?}");
    assert_eq!(log[0]["reason"], "payload", "{log:?}");
    std::fs::write(&proxy.log_path, b"").expect("truncate log");

    // [MS-TURN] over TCP: framing header 02 00 + length, header without
    // the cookie, MAGIC-COOKIE attribute first. Teams is blocked.
    let mut ms = vec![0x02, 0x00, 0x00, 0x1c, 0x00, 0x03, 0x00, 0x08];
    ms.extend_from_slice(&[0x6d; 16]); // transaction id
    ms.extend_from_slice(&[0x00, 0x0f, 0x00, 0x04, 0x72, 0xc6, 0x4b, 0xc6]);
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&ms).await.expect("write");
    assert!(is_refused(&mut s).await, "MS-TURN not refused");
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["app"], "teams", "{log:?}");
    assert_eq!(log[0]["verdict"], "block", "{log:?}");
    assert_eq!(origin.connection_bytes(1), b"");
}

/// Bind an origin on port 443 of a loopback address, if this host allows it.
async fn origin_on_443(banner: Option<&'static [u8]>) -> Option<tokio::net::TcpListener> {
    let _ = banner;
    for ip in ["127.0.0.43", "127.0.0.1"] {
        if let Ok(l) = tokio::net::TcpListener::bind((ip, 443)).await {
            return Some(l);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_tls_on_443_is_refused_and_tls_passes() {
    let Some(listener) = origin_on_443(None).await else {
        support::skip_or_fail("cannot bind port 443 on loopback (needs root)");
        return;
    };
    let addr = listener.local_addr().expect("addr");
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r2 = std::sync::Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let r = std::sync::Arc::clone(&r2);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    r.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let proxy = Proxy::start(FAST).await;
    // An unknown binary protocol on 443, then silence on 443.
    let mut s = connect_tunnel(proxy.addr, &addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&[0x13, 0x37, 0x00, 0x42, 0x99, 0x01])
        .await
        .expect("write");
    assert!(is_refused(&mut s).await);
    let mut s = connect_tunnel(proxy.addr, &addr.to_string())
        .await
        .expect("CONNECT");
    assert!(
        is_refused(&mut s).await,
        "a silent client on 443 must be refused after the deadline"
    );
    // Telegram's MTProto on 443 is named by its payload signature.
    let mut s = connect_tunnel(proxy.addr, &addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&[
        0xee, 0xee, 0xee, 0xee, 0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ])
    .await
    .expect("write");
    assert!(is_refused(&mut s).await);
    // Plain HTTP to port 443 is not TLS either.
    let mut s = connect_tunnel(proxy.addr, &addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(is_refused(&mut s).await);
    assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 0);
    let log = proxy.wait_log(4).await;
    let reasons: Vec<_> = log
        .iter()
        .map(|r| (r["reason"].clone(), r["app"].clone()))
        .collect();
    assert_eq!(reasons[0].0, "non_tls", "{log:?}");
    assert_eq!(reasons[1].0, "non_tls");
    assert_eq!(reasons[2], ("non_tls".into(), "telegram".into()), "{log:?}");
    // An ordinary TLS hello on 443 passes.
    let mut s = connect_tunnel(proxy.addr, &addr.to_string())
        .await
        .expect("CONNECT");
    let hello = client_hello("www.example.org", &["h2"], &[]);
    s.write_all(&hello).await.expect("write");
    for _ in 0..200 {
        if received.load(std::sync::atomic::Ordering::SeqCst) >= hello.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        hello.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_over_plain_http_is_refused_on_any_host() {
    let origin = support::HttpOrigin::start().await;
    let proxy = Proxy::start_open().await;
    let o = origin.addr;
    let cases: Vec<(&str, String)> = vec![
        (
            "msn-messenger",
            format!("POST http://{o}/gateway/gateway.dll?Action=open&Server=NS&IP=messenger.hotmail.com HTTP/1.1\r\nHost: {o}\r\nUser-Agent: MSMSGS\r\nContent-Type: application/x-msn-messenger\r\nContent-Length: 18\r\n\r\nVER 1 MSNP8 CVR0\r\n"),
        ),
        (
            "xmpp",
            {
                let body = "<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='example.com' xml:lang='en' wait='60' hold='1' ver='1.6' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>";
                format!("POST http://{o}/http-bind HTTP/1.1\r\nHost: {o}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            },
        ),
        (
            "xmpp",
            format!("GET http://{o}/xmpp-websocket HTTP/1.1\r\nHost: {o}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n<open xmlns=\"urn:ietf:params:xml:ns:xmpp-framing\" to=\"x\" version=\"1.0\"/>"),
        ),
        ("matrix", format!("GET http://{o}/_matrix/client/v3/sync HTTP/1.1\r\nHost: {o}\r\n\r\n")),
    ];
    for (app, req) in &cases {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let (status, head, _) = read_response(&mut s).await;
        assert_eq!(status, 403, "{app}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("x-chatwall-block: {app}")),
            "{head}"
        );
    }
    assert!(
        origin.requests().is_empty(),
        "the origin saw a refused request: {:?}",
        origin.requests()
    );
    // Telegram's HTTP transport: POST /api with an unencrypted MTProto body.
    let mut body = vec![0u8; 8];
    body.extend_from_slice(&[0x55; 32]);
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        format!(
            "POST http://{o}/api HTTP/1.1\r\nHost: {o}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    s.write_all(&body).await.expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 403, "{head}");
    // ...while an ordinary POST /api with JSON passes.
    let json = b"{\"query\":\"ok\"}";
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        format!(
            "POST http://{o}/api HTTP/1.1\r\nHost: {o}\r\nContent-Length: {}\r\n\r\n",
            json.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    s.write_all(json).await.expect("write");
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(origin.requests().len(), 1);
    assert_eq!(origin.requests()[0].body_len, json.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_decided_one_by_one() {
    let origin = support::HttpOrigin::start().await;
    let proxy = Proxy::start_open().await;
    let o = origin.addr;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let both = format!(
        "GET http://{o}/first HTTP/1.1\r\nHost: {o}\r\n\r\nGET http://{o}/gateway/gateway.dll?Action=poll&SessionID=1 HTTP/1.1\r\nHost: {o}\r\n\r\nGET http://{o}/third HTTP/1.1\r\nHost: {o}\r\n\r\n"
    );
    s.write_all(both.as_bytes()).await.expect("write");
    let (a, _, body) = read_response(&mut s).await;
    assert_eq!((a, body.as_slice()), (200, &b"hello from origin\n"[..]));
    let (b, head, _) = read_response(&mut s).await;
    assert_eq!(b, 403, "{head}");
    let (c, _, _) = read_response(&mut s).await;
    assert_eq!(c, 200);
    let paths: Vec<String> = origin.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/first", "/third"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_inside_a_connect_tunnel_is_decided_request_by_request() {
    let origin = support::HttpOrigin::start().await;
    let proxy = Proxy::start(FAST).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: www.example.org\r\n\r\n")
        .await
        .expect("write");
    let (a, _, _) = read_response(&mut s).await;
    assert_eq!(a, 200);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await
        .expect("write");
    let (b, head, _) = read_response(&mut s).await;
    assert_eq!(b, 403, "{head}");
    assert!(head.contains("whatsapp"));
    let paths: Vec<String> = origin.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hellos_in_tiny_records_are_decided_or_refused_never_passed_blind() {
    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start("[access]\ndeny_destinations = []\n[inspect]\nclient_bytes = 4096\nfirst_bytes_timeout_ms = 1500\n").await;
    // Fits the window even at six bytes on the wire per hello byte: decided on SNI.
    let hello = client_hello("web.whatsapp.com", &[], &[]);
    let tiny = records(&handshake_of(&hello), 1);
    assert!(tiny.len() < 4096);
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&tiny).await.expect("write");
    assert!(is_refused(&mut s).await);
    // Does not fit: an ordinary name, but the hello cannot be checked.
    let big = client_hello("www.example.org", &["h2"], &[(0x0015, vec![0; 1000])]);
    let tiny = records(&handshake_of(&big), 1);
    assert!(tiny.len() > 4096);
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    let _ = s.write_all(&tiny).await;
    assert!(is_refused(&mut s).await);
    // A hello that starts and stalls.
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&big[..100]).await.expect("write");
    assert!(is_refused(&mut s).await);
    let log = proxy.wait_log(3).await;
    let reasons: Vec<_> = log
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(reasons, ["sni", "non_tls", "non_tls"], "{log:?}");
    assert_eq!(origin.total_received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_rustls_and_openssl_hellos_with_an_im_sni_are_reset() {
    let origin = support::TlsOrigin::start(&["web.whatsapp.com", "localhost"]).await;
    let proxy = Proxy::start(FAST).await;
    // rustls, through a CONNECT to an allowed address.
    let s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    let connector = tokio_rustls::TlsConnector::from(origin.client_config());
    let name = rustls::pki_types::ServerName::try_from("web.whatsapp.com").expect("name");
    let handshake = tokio::time::timeout(WAIT, connector.connect(name, s))
        .await
        .expect("in time");
    assert!(handshake.is_err(), "the handshake must not complete");
    // The same client and origin with an ordinary name complete.
    let s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio::time::timeout(WAIT, connector.connect(name, s))
        .await
        .expect("in time")
        .expect("handshake");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).ends_with("hello over tls\n"));

    // openssl s_client speaks CONNECT itself (-proxy).
    let have_openssl = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok();
    if !have_openssl {
        support::skip_or_fail("openssl is not installed");
        return;
    }
    let args = vec![
        "s_client".to_string(),
        "-proxy".into(),
        proxy.addr.to_string(),
        "-connect".into(),
        origin.addr.to_string(),
        "-servername".into(),
        "web.whatsapp.com".into(),
        "-CAfile".into(),
        origin.cert_pem_path.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("10")
            .arg("openssl")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("join")
    .expect("openssl runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no peer certificate available") && !text.contains("Server certificate"),
        "the handshake completed: {text}"
    );
    let log = proxy.wait_log(3).await;
    let sni_blocks = log
        .iter()
        .filter(|r| r["reason"] == "sni" && r["app"] == "whatsapp")
        .count();
    assert_eq!(sni_blocks, 2, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_and_ja4_rules_decide_client_hellos() {
    let origin = RawOrigin::start(None, false).await;
    // ALPN from the bundled set: XMPP over direct TLS (XEP-0368).
    let proxy = Proxy::start(FAST).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&client_hello("chat.example.net", &["xmpp-client"], &[]))
        .await
        .expect("write");
    assert!(is_refused(&mut s).await);
    let log = proxy.wait_log(1).await;
    assert_eq!(
        (log[0]["app"].as_str(), log[0]["reason"].as_str()),
        (Some("xmpp"), Some("alpn")),
        "{log:?}"
    );

    // A JA4 rule in a signature directory of our own.
    let hello = client_hello("www.example.org", &["h2"], &[]);
    let chatwall::classify::tls::Hello::Complete(parsed) =
        chatwall::classify::tls::inspect_client_hello(&hello)
    else {
        panic!("the test hello must parse");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("fingerprinted.toml"),
        format!("id = \"fingerprinted\"\nname = \"Fingerprinted\"\ncategory = \"consumer-im\"\n[[tls]]\nja4 = [\"{}\"]\nsource = \"test fixture\"\n", parsed.ja4),
    )
    .expect("write sig");
    let proxy = Proxy::start(&format!(
        "{FAST}[signatures]\ndir = {:?}\n",
        dir.path().display().to_string()
    ))
    .await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&hello).await.expect("write");
    assert!(is_refused(&mut s).await);
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["reason"], "ja4", "{log:?}");
    assert_eq!(log[0]["ja4"], parsed.ja4.as_str());
    assert_eq!(origin.total_received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tunnel_data_passes_byte_exact_both_ways_and_half_closes() {
    // An echo origin: every byte comes back; the client sends 48 MiB, then
    // shuts down its write side and must still read every echoed byte.
    let origin = RawOrigin::start(None, true).await;
    let proxy = Proxy::start(FAST).await;
    let s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    let (mut rd, mut wr) = s.into_split();
    let total: usize = 48 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        let mut chunk = vec![0u8; 256 * 1024];
        while sent < total {
            let n = chunk.len().min(total - sent);
            for (k, b) in chunk[..n].iter_mut().enumerate() {
                *b = support::pattern_byte(sent + k);
            }
            wr.write_all(&chunk[..n]).await.expect("write");
            sent += n;
        }
        wr.shutdown().await.expect("half-close");
        wr
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 128 * 1024];
    let mut mismatch = None;
    loop {
        let n = tokio::time::timeout(WAIT, rd.read(&mut buf))
            .await
            .expect("no stall")
            .expect("read");
        if n == 0 {
            break;
        }
        for (k, &b) in buf[..n].iter().enumerate() {
            if mismatch.is_none() && b != support::pattern_byte(got + k) {
                mismatch = Some(got + k);
            }
        }
        got += n;
        if got >= total {
            break;
        }
    }
    let _wr = writer.await.expect("writer");
    assert_eq!(mismatch, None, "corrupted byte");
    assert_eq!(got, total);
    // The origin's end: every byte as sent, in order, on one connection
    // (most of it moved by splice).
    let at_origin = origin.connection_bytes(0);
    assert_eq!(at_origin.len(), total);
    let first_bad = at_origin
        .iter()
        .enumerate()
        .position(|(k, &b)| b != support::pattern_byte(k));
    assert_eq!(first_bad, None, "corrupted byte at the origin");
    assert_eq!(origin.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(rd);
    let log = proxy.wait_log(1).await;
    assert_eq!(log[0]["bytes_up"].as_u64(), Some(total as u64), "{log:?}");
    assert_eq!(log[0]["bytes_down"].as_u64(), Some(total as u64));
}
