//! Hand-built first bytes of real protocols, and a deterministic PRNG.
//!
//! Shared by the fuzz crate (seed corpus), `tests/fuzz_smoke.rs` (which
//! includes the fuzz crate's `lib.rs` as a module) and the benchmarks
//! (`benches/classify.rs`, `benches/proxy.rs` include this file with
//! `#[path]`). It depends on `std` only, so every one of those crates can
//! compile it as a module of its own.

/// One TLS extension: type and raw `extension_data`.
pub type Extension = (u16, Vec<u8>);

/// Marsaglia's xorshift64: deterministic noise without a `rand` dependency.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-enough in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// A ClientHello in one record, built field by field (RFC 8446 §4.1.2):
/// server_name, supported_groups, signature_algorithms, ALPN (if any),
/// supported_versions, then `extra` in order.
pub fn client_hello(sni: &str, alpn: &[&str], extra: &[Extension]) -> Vec<u8> {
    let mut exts = vec![(0x0000, server_name(sni))];
    exts.push((0x000a, vec![0x00, 0x02, 0x00, 0x1d]));
    exts.push((0x000d, vec![0x00, 0x04, 0x04, 0x03, 0x08, 0x04]));
    if !alpn.is_empty() {
        exts.push((0x0010, alpn_list(alpn)));
    }
    exts.push((0x002b, vec![0x04, 0x03, 0x04, 0x03, 0x03]));
    exts.extend(extra.iter().cloned());
    let suites = [0x1301, 0x1302, 0xc02f];
    records(&handshake(&suites, &exts), usize::MAX)
}

/// A ClientHello shaped like a current desktop browser's (GREASE, 15
/// cipher suites, 16 extensions) for `sni` with ALPN h2 and http/1.1.
///
/// Without `post_quantum` it carries an X25519 key share and is padded
/// (RFC 7685) to a 512-byte handshake message: 517 bytes on the wire. With
/// it, an X25519MLKEM768 share (1216 bytes) comes first and a resumption
/// offer (pre_shared_key) ends it, without padding: 1.8 KB, more than one
/// TCP segment.
pub fn browser_hello(sni: &str, post_quantum: bool) -> Vec<u8> {
    let suites = [
        0x0a0a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
        0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
    ];
    let mut groups = vec![0x0a0a, 0x001d, 0x0017, 0x0018];
    let mut shares = vec![(0x0a0a_u16, vec![0u8]), (0x001d, vec![0x42; 32])];
    if post_quantum {
        groups.insert(1, 0x11ec);
        shares.insert(1, (0x11ec, vec![0x5c; 1216]));
    }
    let mut key_share = Vec::new();
    for (group, share) in &shares {
        key_share.extend_from_slice(&group.to_be_bytes());
        key_share.extend_from_slice(&len16(share.len()));
        key_share.extend_from_slice(share);
    }
    let mut exts: Vec<Extension> = vec![
        (0x0a0a, Vec::new()), // GREASE
        (0x0000, server_name(sni)),
        (0x0017, Vec::new()), // extended_master_secret
        (0xff01, vec![0]),    // renegotiation_info
        (0x000a, u16_vector(&groups)),
        (0x000b, vec![1, 0]), // ec_point_formats: uncompressed
        (0x0023, Vec::new()), // session_ticket
        (0x0010, alpn_list(&["h2", "http/1.1"])),
        (0x0005, vec![1, 0, 0, 0, 0]), // status_request: OCSP
        (
            0x000d,
            u16_vector(&[
                0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
            ]),
        ),
        (0x0012, Vec::new()), // signed_certificate_timestamp
        (0x0033, prefixed16(&key_share)),
        (0x002d, vec![1, 1]), // psk_key_exchange_modes: psk_dhe_ke
        (0x002b, vec![6, 0x1a, 0x1a, 3, 4, 3, 3]), // supported_versions: GREASE, 1.3, 1.2
        (0x001b, vec![2, 0, 2]), // compress_certificate: brotli
        (0x4469, vec![0, 3, 2, b'h', b'2']), // application_settings
        (0x1a1a, vec![0]),    // GREASE
    ];
    if post_quantum {
        // pre_shared_key (last, RFC 8446 §4.2.11): a resumption offer of
        // one 192-byte ticket and its 32-byte binder.
        let mut identity = len16(192).to_vec();
        identity.extend_from_slice(&[0x7e; 192]);
        identity.extend_from_slice(&0x0001_2345_u32.to_be_bytes()); // obfuscated_ticket_age
        let mut binder = vec![32];
        binder.extend_from_slice(&[0xb1; 32]);
        let mut psk = prefixed16(&identity);
        psk.extend_from_slice(&prefixed16(&binder));
        exts.push((0x0029, psk));
    } else {
        // padding: the handshake message becomes exactly 512 bytes.
        let unpadded = handshake(&suites, &exts).len();
        let pad = 512usize.saturating_sub(unpadded + 4);
        exts.push((0x0015, vec![0; pad]));
    }
    records(&handshake(&suites, &exts), usize::MAX)
}

/// The ClientHello handshake message (type 1) with these cipher suites and
/// extensions, TLS 1.2 legacy_version, fixed random and session id.
pub fn handshake(suites: &[u16], extensions: &[Extension]) -> Vec<u8> {
    let mut exts = Vec::new();
    for (ty, body) in extensions {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&len16(body.len()));
        exts.extend_from_slice(body);
    }
    let mut hello = vec![0x03, 0x03]; // legacy_version TLS 1.2
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(32); // legacy_session_id
    hello.extend_from_slice(&[0x11; 32]);
    hello.extend_from_slice(&u16_vector(suites));
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&prefixed16(&exts));
    let mut message = vec![0x01];
    message.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&hello);
    message
}

/// Frame a handshake message into TLS records of at most `max` bytes.
pub fn records(message: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(max.max(1)) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&len16(chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

/// A TLS 1.2 server's first flight (RFC 5246 §7.3) built field by field:
/// ServerHello, Certificate carrying `chain` (leaf first, RFC 5246 §7.4.2),
/// ServerHelloDone; in handshake records of at most `max` bytes.
pub fn server_flight(chain: &[&[u8]], max: usize) -> Vec<u8> {
    let mut list = Vec::new();
    for cert in chain {
        list.extend_from_slice(&len24(cert.len()));
        list.extend_from_slice(cert);
    }
    let mut certificate = len24(list.len()).to_vec();
    certificate.extend_from_slice(&list);
    let mut messages = server_hello();
    messages.push(11); // certificate
    messages.extend_from_slice(&len24(certificate.len()));
    messages.extend_from_slice(&certificate);
    messages.extend_from_slice(&[14, 0, 0, 0]); // server_hello_done
    records(&messages, max)
}

/// A TLS 1.2 ServerHello followed by the handshake bytes `next`, in one
/// record.
pub fn server_hello_then(next: &[u8]) -> Vec<u8> {
    let mut messages = server_hello();
    messages.extend_from_slice(next);
    records(&messages, usize::MAX)
}

/// A ServerHello handshake message (RFC 5246 §7.4.1.3): TLS 1.2, fixed
/// random and session id, ECDHE-RSA-AES128-GCM-SHA256, renegotiation_info.
fn server_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x03]; // server_version
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(32); // session_id
    hello.extend_from_slice(&[0x07; 32]);
    hello.extend_from_slice(&[0xc0, 0x2f, 0x00]); // cipher_suite, compression
    hello.extend_from_slice(&prefixed16(&[0xff, 0x01, 0x00, 0x01, 0x00]));
    let mut message = vec![0x02];
    message.extend_from_slice(&len24(hello.len()));
    message.extend_from_slice(&hello);
    message
}

fn len24(n: usize) -> [u8; 3] {
    let [_, a, b, c] = u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    [a, b, c]
}

/// server_name extension data (RFC 6066 §3) with one host_name.
fn server_name(sni: &str) -> Vec<u8> {
    let mut entry = vec![0];
    entry.extend_from_slice(&len16(sni.len()));
    entry.extend_from_slice(sni.as_bytes());
    prefixed16(&entry)
}

/// ALPN extension data (RFC 7301 §3.1).
fn alpn_list(protocols: &[&str]) -> Vec<u8> {
    let mut list = Vec::new();
    for p in protocols {
        list.push(p.len() as u8);
        list.extend_from_slice(p.as_bytes());
    }
    prefixed16(&list)
}

fn u16_vector(values: &[u16]) -> Vec<u8> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    prefixed16(&bytes)
}

fn prefixed16(body: &[u8]) -> Vec<u8> {
    let mut out = len16(body.len()).to_vec();
    out.extend_from_slice(body);
    out
}

fn len16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

/// A browser's request head for an ordinary page (origin form, as sent
/// inside a tunnel).
pub fn http_request_head() -> Vec<u8> {
    b"GET /news/2024/index.html?ref=home HTTP/1.1\r\n\
Host: www.example.org\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Connection: keep-alive\r\n\
Cookie: session=6f1c2a9e0b7d4c33a1e5; theme=dark\r\n\
Upgrade-Insecure-Requests: 1\r\n\
Sec-Fetch-Dest: document\r\n\
Sec-Fetch-Mode: navigate\r\n\
Sec-Fetch-Site: same-origin\r\n\r\n"
        .to_vec()
}

/// An OpenSSH client's identification string (RFC 4253 §4.2).
pub fn ssh_banner() -> Vec<u8> {
    b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n".to_vec()
}

/// First client bytes of IM protocols, built from their specifications
/// (the cases of `tests/inspect.rs`, and STUN/TURN requests).
pub fn im_first_bytes() -> Vec<(&'static str, Vec<u8>)> {
    let mut oscar = vec![0x2a, 0x01, 0x12, 0x34, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x01];
    oscar.extend_from_slice(&[0x00, 0x06, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef]);
    let mut ymsg = b"YMSG".to_vec();
    ymsg.extend_from_slice(&[0x00, 0x10, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x57]);
    ymsg.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    ymsg.extend_from_slice(b"1\xc0\x80alice\xc0\x80");
    vec![
        ("oscar", oscar),
        ("ymsg", ymsg),
        ("msnp", b"VER 1 MSNP15 MSNP14 MSNP13 CVR0\r\n".to_vec()),
        (
            "xmpp",
            b"<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' \
xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
                .to_vec(),
        ),
        (
            "whatsapp",
            vec![0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24, 0x12, 0x22],
        ),
        (
            "mtproto",
            vec![
                0xee, 0xee, 0xee, 0xee, 0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        ("irc", b"NICK alice\r\nUSER alice 0 * :Alice\r\n".to_vec()),
        ("turn-allocate", turn_allocate()),
        ("stun-binding-framed", {
            // RFC 4571 §2 length, then an RFC 8489 Binding request.
            let mut m = vec![0x00, 0x14, 0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
            m.extend_from_slice(&[0x3c; 12]);
            m
        }),
        ("ms-turn-allocate", {
            // [MS-TURN] §2.1.4 framing, §2.2.2 header, MAGIC-COOKIE first.
            let mut m = vec![0x02, 0x00, 0x00, 0x1c, 0x00, 0x03, 0x00, 0x08];
            m.extend_from_slice(&[0x6d; 16]);
            m.extend_from_slice(&[0x00, 0x0f, 0x00, 0x04, 0x72, 0xc6, 0x4b, 0xc6]);
            m
        }),
    ]
}

/// An RFC 8656 Allocate request: the RFC 8489 header (type 0x0003, length,
/// magic cookie 0x2112A442, transaction id) and REQUESTED-TRANSPORT UDP.
pub fn turn_allocate() -> Vec<u8> {
    let mut m = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&[0x4b; 12]);
    m.extend_from_slice(&[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]);
    m
}

/// First client bytes of ordinary protocols that must pass.
pub fn ordinary_first_bytes() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("ssh", ssh_banner()),
        ("http", http_request_head()),
        (
            "smtp",
            b"EHLO mail.example.com\r\nMAIL FROM:<a@example.com>\r\n".to_vec(),
        ),
        (
            "imap",
            b"a001 LOGIN user pass\r\na002 SELECT INBOX\r\n".to_vec(),
        ),
        ("redis", b"*1\r\n$4\r\nPING\r\n".to_vec()),
        (
            "postgres",
            vec![0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f],
        ),
    ]
}

/// Request heads (with bodies where they have one) that the HTTP rules
/// decide on: IM over HTTP and ordinary requests.
pub fn http_requests() -> Vec<(&'static str, Vec<u8>)> {
    let bosh = "<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='example.com' \
                wait='60' hold='1' ver='1.6'/>";
    vec![
        (
            "msn-gateway",
            b"POST http://gateway.example/gateway/gateway.dll?Action=open&Server=NS HTTP/1.1\r\n\
Host: gateway.example\r\nUser-Agent: MSMSGS\r\nContent-Type: application/x-msn-messenger\r\n\
Content-Length: 18\r\n\r\nVER 1 MSNP8 CVR0\r\n"
                .to_vec(),
        ),
        (
            "bosh",
            format!(
                "POST /http-bind HTTP/1.1\r\nHost: chat.example\r\nContent-Type: text/xml\r\n\
                 Content-Length: {}\r\n\r\n{bosh}",
                bosh.len()
            )
            .into_bytes(),
        ),
        (
            "xmpp-websocket",
            b"GET /xmpp-websocket HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: xmpp\r\n\r\n"
                .to_vec(),
        ),
        (
            "matrix",
            b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: matrix.example\r\n\r\n".to_vec(),
        ),
        ("telegram-api", {
            let mut r = b"POST http://149.154.167.51/api HTTP/1.1\r\nHost: 149.154.167.51\r\n\
Content-Length: 40\r\n\r\n"
                .to_vec();
            r.extend_from_slice(&[0; 8]);
            r.extend_from_slice(&[0x55; 32]);
            r
        }),
        ("browser-get", http_request_head()),
        (
            "pipelined-chunked",
            b"GET /a HTTP/1.1\r\nHost: one.example\r\nConnection: keep-alive\r\n\r\n\
PUT /b HTTP/1.1\r\nHost: two.example\r\nTransfer-Encoding: chunked\r\n\r\n\
5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n\
POST /c HTTP/1.1\r\nHost: three.example\r\nContent-Length: 3\r\n\r\nabc\
GET /chat HTTP/1.1\r\nHost: four.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
                .to_vec(),
        ),
        (
            "json-post",
            b"POST /api HTTP/1.1\r\nHost: app.example\r\nContent-Length: 14\r\n\r\n{\"query\":\"ok\"}"
                .to_vec(),
        ),
    ]
}
