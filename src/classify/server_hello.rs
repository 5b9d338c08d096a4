//! Incremental inspection of a TLS server's first flight: the names of the
//! certificate a server sends in clear in TLS 1.2 and below.
//!
//! Dependency: the `x509-parser` crate (rusticata) for the certificate
//! itself; nothing here decodes DER by hand.
//!
//! This module owns the question "which names does the server's certificate
//! carry?", the server side of what [`super::tls`] asks of the client. The
//! caller hands [`inspect_server_flight`] every byte the server has sent so
//! far, each time more arrive, and gets one of four answers: more bytes are
//! needed; the stream is not TLS (for good); the names are not in clear
//! (TLS 1.3, a resumed session, no certificate); or the names of the leaf
//! certificate. The module is pure: no I/O, no state between calls, no
//! panics on any input. Holding the server's bytes until an answer, and what
//! to do with it, is the caller's business.
//!
//! What is parsed, and where it is specified:
//! - the record layer, RFC 5246 §6.2.1 (RFC 8446 §5.1): records with a
//!   version 0x0300..=0x0304 and a non-zero length. Handshake messages are
//!   reassembled across records (a Certificate message rarely fits one) and
//!   may not be interleaved with records of other types;
//! - the ServerHello, RFC 5246 §7.4.1.3 (extensions optional), and its
//!   supported_versions extension, RFC 8446 §4.2.1: a selected version of
//!   TLS 1.3 (0x0304) or above means everything after the ServerHello is
//!   encrypted;
//! - the handshake order, RFC 5246 §7.3: in a full handshake the server's
//!   Certificate, when there is one, is the message right after the
//!   ServerHello; in an abbreviated handshake (RFC 5246 §7.3, RFC 5077 §3.1)
//!   the ServerHello is followed by NewSessionTicket or ChangeCipherSpec and
//!   no certificate is sent;
//! - the Certificate message, RFC 5246 §7.4.2: `certificate_list`, whose
//!   first entry is the server's own (leaf) certificate;
//! - in that certificate, RFC 5280: the subject's commonName attributes
//!   (§4.1.2.6) and the dNSName entries of subjectAltName (§4.2.1.6).
//!
//! Only the leaf is needed, so the answer comes as soon as the leaf is
//! complete, before the rest of the chain. Names are lower-cased with one
//! trailing dot removed, like hosts elsewhere; empty ones are dropped and
//! duplicates kept once, commonNames first. A wildcard name stays as written
//! (`*.example.com`): matching it is the signature set's business.
//!
//! Limits: if the leaf certificate would end more than
//! [`MAX_SERVER_FLIGHT`] handshake bytes into the stream (a huge ServerHello
//! or a huge leaf), the answer is [`ServerFlight::Hidden`]: bounded memory
//! beats a name, and the client-side checks still apply. Records may be as
//! small as one byte, so a caller that buffers until a decision should allow
//! for up to six times that on the wire.

use std::borrow::Cow;

use x509_parser::extensions::{GeneralName, ParsedExtension};

/// Outcome of looking at a growing prefix of a server stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFlight {
    /// Not (yet) decidable: the bytes so far are a valid prefix of a TLS
    /// server flight whose answer depends on bytes still to come.
    NeedMore,
    /// The bytes are not the start of a TLS server flight (a first record
    /// that is not a handshake or an alert, a first message that is not a
    /// ServerHello, or inconsistent framing). Decided for good.
    NotTls,
    /// TLS 1.3 (supported_versions in ServerHello says 0x0304), or an
    /// abbreviated handshake / no Certificate before ServerHelloDone or
    /// ChangeCipherSpec: nothing in clear. Also an alert instead of a flight,
    /// a leaf certificate that does not parse, and a flight past
    /// [`MAX_SERVER_FLIGHT`]. Decided for good.
    Hidden,
    /// Names of the leaf certificate: subject CN and SAN dNSNames,
    /// normalised like hosts (lower case, no trailing dot); empty for a
    /// certificate that names no host. Decided for good.
    Names(Vec<String>),
}

/// Most handshake bytes reassembled, from the start of the ServerHello to
/// the end of the leaf certificate. Real leaves are 1-4 KiB and ServerHellos
/// under 200 bytes; past this the answer is [`ServerFlight::Hidden`].
pub const MAX_SERVER_FLIGHT: usize = 64 * 1024;

/// Record content types (RFC 5246 §6.2.1).
const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
/// Handshake message types (RFC 5246 §7.4, RFC 5077 §3.3, RFC 6066 §8).
const HANDSHAKE_SERVER_HELLO: u8 = 2;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_CERTIFICATE: u8 = 11;
const HANDSHAKE_SERVER_KEY_EXCHANGE: u8 = 12;
const HANDSHAKE_CERTIFICATE_REQUEST: u8 = 13;
const HANDSHAKE_SERVER_HELLO_DONE: u8 = 14;
/// Record header: type(1), version(2), length(2).
const RECORD_HEADER_LEN: usize = 5;
/// Handshake header: msg_type(1), length(3).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest record accepted: 2^14 + 2048, the TLSCiphertext bound of
/// RFC 5246 §6.2.3 (plaintext records stay under 2^14).
const MAX_RECORD_LEN: usize = (1 << 14) + 2048;
/// Smallest ServerHello body: server_version(2), random(32), an empty
/// session_id(1), cipher_suite(2), compression_method(1).
const MIN_SERVER_HELLO: usize = 2 + 32 + 1 + 2 + 1;
/// Longest session_id (RFC 5246 §7.4.1.2: `opaque SessionID<0..32>`).
const MAX_SESSION_ID: usize = 32;
/// A 24-bit length, as in the Certificate message.
const U24_LEN: usize = 3;
/// supported_versions (RFC 8446 §4.2.1).
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;
/// The first version whose handshake after the ServerHello is encrypted.
const TLS13: u16 = 0x0304;

/// Looks at the bytes a server has sent so far (`buf`, growing between
/// calls, from the first byte of the connection) and tells what its
/// certificate says.
///
/// Any prefix of a flight gives [`ServerFlight::NeedMore`] until the answer
/// is known; every other answer is final: a longer buffer starting with the
/// same bytes gives the same answer.
pub fn inspect_server_flight(buf: &[u8]) -> ServerFlight {
    // Borrowed while the messages sit in one record, owned once a second
    // record contributes.
    let mut handshake: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut pos = 0;
    loop {
        if let Some(answer) = judge(&handshake) {
            return answer;
        }
        let rest = buf.get(pos..).unwrap_or_default();
        let (content_type, len) = match record_header(rest) {
            RecordHeader::Partial => return ServerFlight::NeedMore,
            RecordHeader::Invalid => return ServerFlight::NotTls,
            RecordHeader::Full(content_type, len) => (content_type, len),
        };
        if content_type != CONTENT_HANDSHAKE {
            return other_record(content_type, &handshake);
        }
        let available = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let (payload, complete) = match available.get(..len) {
            Some(payload) => (payload, true),
            None => (available, false),
        };
        if handshake.is_empty() {
            handshake = Cow::Borrowed(payload);
        } else {
            handshake.to_mut().extend_from_slice(payload);
        }
        if !complete {
            return judge(&handshake).unwrap_or(ServerFlight::NeedMore);
        }
        pos = pos.saturating_add(RECORD_HEADER_LEN).saturating_add(len);
    }
}

/// Entry point for fuzz targets: inspects `data`, its first 64 prefixes and
/// its last 64 prefixes, and checks that every answer but `NeedMore` is
/// final.
///
/// # Panics
///
/// Only if an invariant is violated (that is, on a bug): a prefix gave an
/// answer other than `NeedMore` and the whole input gave a different one.
pub fn fuzz_logic(data: &[u8]) {
    let whole = inspect_server_flight(data);
    if let ServerFlight::Names(names) = &whole {
        for name in names {
            assert!(!name.is_empty(), "an empty name");
            assert!(!name.ends_with('.'), "a trailing dot");
            assert!(
                !name.bytes().any(|b| b.is_ascii_uppercase()),
                "an upper-case name"
            );
        }
    }
    let head = 0..=data.len().min(64);
    let tail = data.len().saturating_sub(64)..=data.len();
    for cut in head.chain(tail) {
        let prefix = data.get(..cut).unwrap_or_default();
        let answer = inspect_server_flight(prefix);
        if answer != ServerFlight::NeedMore {
            assert_eq!(answer, whole, "an answer changed with more bytes");
        }
    }
}

/// What a possibly partial record header says.
enum RecordHeader {
    Partial,
    Invalid,
    /// A full, valid header: content type and payload length.
    Full(u8, usize),
}

/// Checks the (possibly partial) record header at the start of `rest`.
fn record_header(rest: &[u8]) -> RecordHeader {
    let Some(&content_type) = rest.first() else {
        return RecordHeader::Partial;
    };
    if !matches!(
        content_type,
        CONTENT_CHANGE_CIPHER_SPEC | CONTENT_ALERT | CONTENT_HANDSHAKE | CONTENT_APPLICATION_DATA
    ) {
        return RecordHeader::Invalid;
    }
    // ProtocolVersion: SSL 3.0 (0x0300) to TLS 1.3 (0x0304).
    if rest.get(1).is_some_and(|&major| major != 3) || rest.get(2).is_some_and(|&minor| minor > 4) {
        return RecordHeader::Invalid;
    }
    match *rest {
        [_, _, _, hi, lo, ..] => match usize::from(u16::from_be_bytes([hi, lo])) {
            0 => RecordHeader::Invalid,
            len if len > MAX_RECORD_LEN => RecordHeader::Invalid,
            len => RecordHeader::Full(content_type, len),
        },
        [_, _, _, hi] if usize::from(hi) << 8 > MAX_RECORD_LEN => RecordHeader::Invalid,
        _ => RecordHeader::Partial,
    }
}

/// A record that is not a handshake record, after the handshake bytes in
/// `handshake`. Handshake messages may not be interleaved with other records
/// (RFC 8446 §5.1), so it must come at a message boundary.
fn other_record(content_type: u8, handshake: &[u8]) -> ServerFlight {
    let Some(boundary) = message_boundary(handshake) else {
        return ServerFlight::NotTls;
    };
    match content_type {
        // The server refused the hello: TLS, but no certificate.
        CONTENT_ALERT => ServerFlight::Hidden,
        // After a ServerHello: an abbreviated handshake (RFC 5246 §7.3), or
        // TLS 1.3's compatibility ChangeCipherSpec and encrypted records.
        CONTENT_CHANGE_CIPHER_SPEC | CONTENT_APPLICATION_DATA if boundary > 0 => {
            ServerFlight::Hidden
        }
        _ => ServerFlight::NotTls,
    }
}

/// Where the last whole message of `handshake` ends, if the bytes are a
/// sequence of whole messages (nothing pending).
fn message_boundary(handshake: &[u8]) -> Option<usize> {
    let mut pos = 0;
    while pos < handshake.len() {
        let len = handshake
            .get(pos + 1..pos + HANDSHAKE_HEADER_LEN)
            .map(u24)?;
        pos = pos.checked_add(HANDSHAKE_HEADER_LEN)?.checked_add(len)?;
    }
    (pos == handshake.len()).then_some(pos)
}

/// A big-endian 24-bit length; missing low-order bytes count as zero, so a
/// partial length gives the smallest value it can still become.
fn u24(bytes: &[u8]) -> usize {
    let mut be = [0u8; 4];
    for (dst, src) in be.iter_mut().skip(1).zip(bytes) {
        *dst = *src;
    }
    usize::try_from(u32::from_be_bytes(be)).unwrap_or(usize::MAX)
}

/// The answer the handshake bytes gathered so far give, if they give one.
/// Monotone: once it answers, any longer `handshake` gives the same answer.
fn judge(handshake: &[u8]) -> Option<ServerFlight> {
    let first = handshake.first()?;
    if *first != HANDSHAKE_SERVER_HELLO {
        return Some(ServerFlight::NotTls);
    }
    let hello_len = u24(handshake.get(1..).unwrap_or_default());
    let hello_end = HANDSHAKE_HEADER_LEN.saturating_add(hello_len);
    if hello_end > MAX_SERVER_FLIGHT {
        return Some(ServerFlight::Hidden);
    }
    if handshake.len() < HANDSHAKE_HEADER_LEN {
        return None;
    }
    if hello_len < MIN_SERVER_HELLO {
        return Some(ServerFlight::NotTls);
    }
    let hello = handshake.get(HANDSHAKE_HEADER_LEN..hello_end)?;
    match parse_server_hello(hello) {
        None => return Some(ServerFlight::NotTls),
        Some(Version::Tls13) => return Some(ServerFlight::Hidden),
        Some(Version::Earlier) => {}
    }
    let next = handshake.get(hello_end..).unwrap_or_default();
    match *next.first()? {
        HANDSHAKE_CERTIFICATE => certificate(next, hello_end),
        // A full handshake without a certificate (anonymous or PSK key
        // exchange), or a resumed session announcing its new ticket.
        HANDSHAKE_NEW_SESSION_TICKET
        | HANDSHAKE_SERVER_KEY_EXCHANGE
        | HANDSHAKE_CERTIFICATE_REQUEST
        | HANDSHAKE_SERVER_HELLO_DONE => Some(ServerFlight::Hidden),
        _ => Some(ServerFlight::NotTls),
    }
}

/// A Certificate message (RFC 5246 §7.4.2) starting at `message`, itself
/// `offset` bytes into the handshake stream: the leaf's names once the leaf
/// is complete.
fn certificate(message: &[u8], offset: usize) -> Option<ServerFlight> {
    // msg_type(1), length(3), certificate_list<0..2^24-1>, whose entries
    // are ASN.1Cert<1..2^24-1>.
    let lengths = |at: usize| message.get(at..at + U24_LEN).map(u24);
    let message_len = lengths(1)?;
    let list_len = lengths(HANDSHAKE_HEADER_LEN)?;
    if list_len.checked_add(U24_LEN) != Some(message_len) {
        return Some(ServerFlight::NotTls);
    }
    if list_len == 0 {
        return Some(ServerFlight::Hidden);
    }
    let leaf_at = HANDSHAKE_HEADER_LEN + U24_LEN + U24_LEN;
    let leaf_len = lengths(HANDSHAKE_HEADER_LEN + U24_LEN)?;
    if leaf_len == 0 || leaf_len.saturating_add(U24_LEN) > list_len {
        return Some(ServerFlight::NotTls);
    }
    let leaf_end = leaf_at.saturating_add(leaf_len);
    if offset.saturating_add(leaf_end) > MAX_SERVER_FLIGHT {
        return Some(ServerFlight::Hidden);
    }
    let leaf = message.get(leaf_at..leaf_end)?;
    Some(match certificate_names(leaf) {
        Some(names) => ServerFlight::Names(names),
        None => ServerFlight::Hidden,
    })
}

/// What a ServerHello says about the rest of the handshake.
enum Version {
    /// TLS 1.3 or later: encrypted after the ServerHello.
    Tls13,
    /// SSL 3.0 to TLS 1.2: the certificate, if any, comes in clear.
    Earlier,
}

/// Parses a ServerHello body (RFC 5246 §7.4.1.3, RFC 8446 §4.1.3); `None`
/// if a length does not fit its container.
fn parse_server_hello(body: &[u8]) -> Option<Version> {
    let mut r = Reader(body);
    let [major, minor] = r.take_array::<2>()?;
    if major != 3 {
        return None;
    }
    let mut version = u16::from_be_bytes([major, minor]);
    r.take(32)?; // random
    let session_id_len = usize::from(r.u8()?);
    if session_id_len > MAX_SESSION_ID {
        return None;
    }
    r.take(session_id_len)?;
    r.take(2)?; // cipher_suite
    r.take(1)?; // compression_method
    if !r.0.is_empty() {
        let block_len = usize::from(r.u16()?);
        let mut extensions = Reader(r.take(block_len)?);
        if !r.0.is_empty() {
            return None;
        }
        while !extensions.0.is_empty() {
            let ext_type = extensions.u16()?;
            let data_len = usize::from(extensions.u16()?);
            let data = extensions.take(data_len)?;
            // selected_version (RFC 8446 §4.2.1). Anything else in its
            // place is left to the messages that follow to settle.
            if let (EXT_SUPPORTED_VERSIONS, &[hi, lo]) = (ext_type, data) {
                version = version.max(u16::from_be_bytes([hi, lo]));
            }
        }
    }
    Some(if version >= TLS13 {
        Version::Tls13
    } else {
        Version::Earlier
    })
}

/// A cursor whose reads fail instead of running past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.take_array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take_array::<2>().map(u16::from_be_bytes)
    }
}

/// The names of a DER certificate: subject commonNames, then the dNSNames
/// of every subjectAltName extension; `None` if the certificate does not
/// parse.
pub fn certificate_names(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names: Vec<String> = Vec::new();
    let mut add = |raw: &str| {
        let mut name = raw.to_ascii_lowercase();
        if name.ends_with('.') {
            name.pop();
        }
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    };
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            add(cn);
        }
    }
    // Every subjectAltName extension, should there be several (RFC 5280
    // §4.2 forbids it; a client that takes the second must not find it
    // unread).
    for extension in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::DNSName(dns) = name {
                    add(dns);
                }
            }
        }
    }
    Some(names)
}

/// The names a certificate vouches for as a TLS client checks them
/// (RFC 6125; webpki ignores the subject CN): its DNS and IP subject
/// alternative names, the CN only when there is no SAN at all. For the
/// names of a decrypted flow's minted leaf and its fronting check.
pub fn certificate_server_names(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names: Vec<String> = Vec::new();
    let mut sans = false;
    for extension in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                let text = match name {
                    GeneralName::DNSName(dns) => {
                        Some(dns.trim_end_matches('.').to_ascii_lowercase())
                    }
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    },
                    _ => None,
                };
                sans = true;
                if let Some(t) = text.filter(|t| !t.is_empty()) {
                    if !names.contains(&t) {
                        names.push(t);
                    }
                }
            }
        }
    }
    if !sans {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                let cn = cn.trim_end_matches('.').to_ascii_lowercase();
                if !cn.is_empty() && !names.contains(&cn) {
                    names.push(cn);
                }
            }
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    use super::*;

    // ---------------------------------------------------------------------
    // Fixture builders
    // ---------------------------------------------------------------------

    /// A certificate (DER) with these subject commonNames and SAN dNSNames,
    /// and its PKCS#8 key.
    fn certificate_der(common_names: &[&str], dns_names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let sans: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        for cn in common_names {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *cn);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.der().to_vec(), key.serialize_der())
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server_config(
        versions: &[&'static rustls::SupportedProtocolVersion],
        der: &[u8],
        key: &[u8],
        max_fragment_size: Option<usize>,
    ) -> Arc<ServerConfig> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(der.to_vec())],
                PrivateKeyDer::Pkcs8(key.to_vec().into()),
            )
            .expect("server config");
        cfg.max_fragment_size = max_fragment_size;
        Arc::new(cfg)
    }

    /// A client offering TLS 1.3 and 1.2 that trusts `der` (a self-signed
    /// certificate is its own trust anchor).
    fn client_config(der: &[u8]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(der.to_vec())).expect("root");
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Everything `write` has to send.
    fn drain(mut write: impl FnMut(&mut Vec<u8>) -> std::io::Result<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        while write(&mut out).expect("write_tls") > 0 {}
        out
    }

    fn feed_server(server: &mut ServerConnection, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            server.read_tls(&mut bytes).expect("read_tls");
            server.process_new_packets().expect("server accepts");
        }
    }

    fn feed_client(client: &mut ClientConnection, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            client.read_tls(&mut bytes).expect("read_tls");
            client.process_new_packets().expect("client accepts");
        }
    }

    /// Runs a handshake in memory; returns the server's first flight, the
    /// bytes it sent in answer to the ClientHello, from rustls itself.
    fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>, complete: bool) -> Vec<u8> {
        let name = "chat.example.com".try_into().expect("server name");
        let mut client = ClientConnection::new(client, name).expect("client");
        let mut server = ServerConnection::new(server).expect("server");
        feed_server(&mut server, &drain(|out| client.write_tls(out)));
        let flight = drain(|out| server.write_tls(out));
        if complete {
            feed_client(&mut client, &flight);
            for _ in 0..4 {
                feed_server(&mut server, &drain(|out| client.write_tls(out)));
                feed_client(&mut client, &drain(|out| server.write_tls(out)));
            }
            assert!(!client.is_handshaking() && !server.is_handshaking());
        }
        flight
    }

    /// One record of `content_type`, version TLS 1.2.
    fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 0x03, 0x03];
        out.extend(u16::try_from(payload.len()).expect("record").to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Handshake records carrying `messages`: first records with the payload
    /// sizes in `sizes`, then one with whatever is left.
    fn records(messages: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = messages;
        for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            if rest.is_empty() {
                break;
            }
            let (payload, tail) = rest.split_at(size.min(rest.len()));
            out.extend(record(CONTENT_HANDSHAKE, payload));
            rest = tail;
        }
        out
    }

    fn u24_bytes(len: usize) -> [u8; 3] {
        let [_, a, b, c] = u32::try_from(len).expect("u24").to_be_bytes();
        [a, b, c]
    }

    /// A handshake message: msg_type(1), length(3), body.
    fn message(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![msg_type];
        out.extend(u24_bytes(body.len()));
        out.extend_from_slice(body);
        out
    }

    /// A ServerHello (RFC 5246 §7.4.1.3) of `version`, with an extensions
    /// block when `extensions` is given.
    fn server_hello(version: u16, extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        body.extend([0x42; 32]); // random
        body.push(32); // session_id
        body.extend([0x07; 32]);
        body.extend([0xc0, 0x2f]); // cipher_suite
        body.push(0); // compression_method
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (ext_type, data) in extensions {
                block.extend(ext_type.to_be_bytes());
                block.extend(u16::try_from(data.len()).expect("ext").to_be_bytes());
                block.extend(data);
            }
            body.extend(u16::try_from(block.len()).expect("block").to_be_bytes());
            body.extend(block);
        }
        message(HANDSHAKE_SERVER_HELLO, &body)
    }

    fn tls12_hello() -> Vec<u8> {
        // renegotiation_info and extended_master_secret, as servers send.
        server_hello(0x0303, Some(&[(0xff01, vec![0]), (0x0017, vec![])]))
    }

    /// A Certificate message (RFC 5246 §7.4.2) carrying `chain`.
    fn certificate_message(chain: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for cert in chain {
            list.extend(u24_bytes(cert.len()));
            list.extend_from_slice(cert);
        }
        let mut body = u24_bytes(list.len()).to_vec();
        body.extend(list);
        message(HANDSHAKE_CERTIFICATE, &body)
    }

    /// Every strict prefix before some cut is `NeedMore`, every prefix from
    /// it on (and the buffer followed by more bytes) gives the answer of the
    /// whole. Returns the answer and the cut.
    fn check_all_prefixes(buf: &[u8]) -> (ServerFlight, usize) {
        let whole = inspect_server_flight(buf);
        let decided_at = (0..=buf.len())
            .find(|&cut| inspect_server_flight(&buf[..cut]) != ServerFlight::NeedMore)
            .unwrap_or(buf.len());
        for cut in 0..decided_at {
            assert_eq!(
                inspect_server_flight(&buf[..cut]),
                ServerFlight::NeedMore,
                "prefix {cut}/{}",
                buf.len()
            );
        }
        for cut in decided_at..=buf.len() {
            assert_eq!(inspect_server_flight(&buf[..cut]), whole, "prefix {cut}");
        }
        if whole != ServerFlight::NeedMore {
            for trailer in [
                &b"\x17\x03\x03\x00\x02\xaa\xbb"[..],
                b"\x16\x03\x03\x00\x01\x0e",
            ] {
                let mut longer = buf.to_vec();
                longer.extend_from_slice(trailer);
                assert_eq!(
                    inspect_server_flight(&longer),
                    whole,
                    "a trailer changed it"
                );
            }
        }
        fuzz_logic(buf);
        (whole, decided_at)
    }

    fn names(list: &[&str]) -> ServerFlight {
        ServerFlight::Names(list.iter().map(|s| s.to_string()).collect())
    }

    // ---------------------------------------------------------------------
    // Real flights from rustls
    // ---------------------------------------------------------------------

    #[test]
    fn tls12_flight_names_the_leaf() {
        let (der, key) = certificate_der(
            &["Chat.Example.COM."],
            &["chat.example.com", "*.whatsapp.net", "Media.Example.NET."],
        );
        let server = server_config(&[&rustls::version::TLS12], &der, &key, None);
        let flight = handshake(server, client_config(&der), false);
        let (answer, decided_at) = check_all_prefixes(&flight);
        // commonName first, then the SANs, each once, normalised.
        assert_eq!(
            answer,
            names(&["chat.example.com", "*.whatsapp.net", "media.example.net"])
        );
        // Decided as soon as the leaf is in: the rest of the flight
        // (ServerKeyExchange, ServerHelloDone) is not waited for.
        let leaf_end = flight
            .windows(der.len())
            .position(|w| w == der)
            .expect("the leaf is in the flight")
            + der.len();
        assert_eq!(decided_at, leaf_end);
        assert!(decided_at < flight.len());
    }

    #[test]
    fn tls12_flight_in_small_records() {
        let (der, key) = certificate_der(&[], &["chat.example.com", "voice.example.org"]);
        // 64-byte records: the Certificate message spans many of them.
        let server = server_config(&[&rustls::version::TLS12], &der, &key, Some(64));
        let flight = handshake(server, client_config(&der), false);
        let record_count = {
            let mut count = 0;
            let mut pos = 0;
            while let Some(len) = flight.get(pos + 3..pos + 5) {
                count += 1;
                pos += RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([len[0], len[1]]));
            }
            count
        };
        assert!(record_count > der.len() / 64, "{record_count} records");
        let (answer, _) = check_all_prefixes(&flight);
        assert_eq!(answer, names(&["chat.example.com", "voice.example.org"]));
    }

    #[test]
    fn tls13_flight_is_hidden_from_the_server_hello_on() {
        let (der, key) = certificate_der(&["chat.example.com"], &["chat.example.com"]);
        let server = server_config(&[&rustls::version::TLS13], &der, &key, None);
        let flight = handshake(server, client_config(&der), false);
        let (answer, decided_at) = check_all_prefixes(&flight);
        assert_eq!(answer, ServerFlight::Hidden);
        // The first record is the ServerHello; nothing after it is needed.
        let hello_len = usize::from(u16::from_be_bytes([flight[3], flight[4]]));
        assert_eq!(decided_at, RECORD_HEADER_LEN + hello_len);
        // And the certificate is in there, but encrypted.
        assert!(!flight.windows(der.len()).any(|w| w == der));
    }

    #[test]
    fn resumed_tls12_session_is_hidden() {
        let (der, key) = certificate_der(&[], &["chat.example.com"]);
        let server = server_config(&[&rustls::version::TLS12], &der, &key, None);
        let client = client_config(&der);
        let full = handshake(server.clone(), client.clone(), true);
        assert_eq!(check_all_prefixes(&full).0, names(&["chat.example.com"]));
        // Same client config, same server: the session is resumed, and the
        // server goes from ServerHello straight to ChangeCipherSpec.
        let resumed = handshake(server, client, true);
        assert!(resumed.len() < full.len());
        assert_eq!(check_all_prefixes(&resumed).0, ServerFlight::Hidden);
    }

    // ---------------------------------------------------------------------
    // Hand-built flights
    // ---------------------------------------------------------------------

    #[test]
    fn certificate_in_any_fragmentation() {
        let (leaf, _) = certificate_der(&["leaf.example"], &["leaf.example", "alt.example"]);
        let (issuer, _) = certificate_der(&["Example CA"], &[]);
        let mut messages = tls12_hello();
        messages.extend(certificate_message(&[&leaf, &issuer]));
        messages.extend(message(HANDSHAKE_SERVER_HELLO_DONE, &[]));
        let want = names(&["leaf.example", "alt.example"]);
        assert_eq!(check_all_prefixes(&records(&messages, &[])).0, want);
        for first in (1..messages.len()).step_by(37) {
            let buf = records(&messages, &[first, 5, 300]);
            assert_eq!(inspect_server_flight(&buf), want, "first record {first}");
        }
        // One-byte records all the way.
        let tiny = records(&messages, &vec![1; messages.len()]);
        assert_eq!(check_all_prefixes(&tiny).0, want);
    }

    #[test]
    fn older_versions_and_no_extensions() {
        let (leaf, _) = certificate_der(&["old.example"], &[]);
        for version in [0x0300, 0x0301, 0x0302, 0x0303] {
            let mut messages = server_hello(version, None);
            messages.extend(certificate_message(&[&leaf]));
            let (answer, _) = check_all_prefixes(&records(&messages, &[]));
            assert_eq!(answer, names(&["old.example"]), "{version:#06x}");
        }
        // supported_versions naming TLS 1.2 is no reason to hide.
        let mut messages = server_hello(0x0303, Some(&[(EXT_SUPPORTED_VERSIONS, vec![3, 3])]));
        messages.extend(certificate_message(&[&leaf]));
        assert_eq!(
            check_all_prefixes(&records(&messages, &[])).0,
            names(&["old.example"])
        );
    }

    #[test]
    fn nothing_in_clear() {
        let (leaf, _) = certificate_der(&["x.example"], &[]);
        let hello = tls12_hello();
        let with = |next: &[u8]| [hello.clone(), next.to_vec()].concat();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "TLS 1.3 selected",
                records(
                    &server_hello(0x0303, Some(&[(EXT_SUPPORTED_VERSIONS, vec![3, 4])])),
                    &[],
                ),
            ),
            (
                "a later version selected",
                records(
                    &server_hello(0x0303, Some(&[(EXT_SUPPORTED_VERSIONS, vec![3, 9])])),
                    &[],
                ),
            ),
            (
                "ServerHelloDone first",
                records(&with(&message(HANDSHAKE_SERVER_HELLO_DONE, &[])), &[]),
            ),
            (
                "ServerKeyExchange first (anonymous or PSK)",
                records(
                    &with(&message(HANDSHAKE_SERVER_KEY_EXCHANGE, &[1; 40])),
                    &[],
                ),
            ),
            (
                "NewSessionTicket (resumption)",
                records(&with(&message(HANDSHAKE_NEW_SESSION_TICKET, &[2; 40])), &[]),
            ),
            (
                "empty certificate list",
                records(&with(&certificate_message(&[])), &[]),
            ),
            (
                "a leaf that is not a certificate",
                records(&with(&certificate_message(&[&[0x30, 0x03, 1, 2, 3]])), &[]),
            ),
            (
                "an alert instead of a flight",
                record(CONTENT_ALERT, &[2, 40]),
            ),
        ];
        // ServerHello, then ChangeCipherSpec: an abbreviated handshake.
        let mut abbreviated = records(&hello, &[]);
        abbreviated.extend(record(CONTENT_CHANGE_CIPHER_SPEC, &[1]));
        abbreviated.extend(record(CONTENT_HANDSHAKE, &[0x99; 40])); // encrypted Finished
        cases.push(("abbreviated handshake", abbreviated));
        // ServerHello, then encrypted records.
        let mut encrypted = records(&hello, &[]);
        encrypted.extend(record(CONTENT_APPLICATION_DATA, &[0x55; 100]));
        cases.push(("encrypted records", encrypted));
        // An alert after the ServerHello.
        let mut alert = records(&hello, &[]);
        alert.extend(record(CONTENT_ALERT, &[2, 42]));
        cases.push(("alert after ServerHello", alert));
        // A leaf that starts well but is cut short inside its own length.
        let cut = &leaf[..leaf.len() - 1];
        cases.push((
            "truncated DER",
            records(&with(&certificate_message(&[cut])), &[]),
        ));
        for (name, buf) in cases {
            assert_eq!(check_all_prefixes(&buf).0, ServerFlight::Hidden, "{name}");
        }
    }

    #[test]
    fn leaf_past_the_limit_is_hidden() {
        // A leaf announced as 70,000 bytes: decided from its length alone.
        let mut messages = tls12_hello();
        let offset = messages.len();
        let leaf_len = 70_000;
        messages.push(HANDSHAKE_CERTIFICATE);
        messages.extend(u24_bytes(leaf_len + 6));
        messages.extend(u24_bytes(leaf_len + 3));
        messages.extend(u24_bytes(leaf_len));
        let buf = records(&messages, &[]);
        let (answer, decided_at) = check_all_prefixes(&buf);
        assert_eq!(answer, ServerFlight::Hidden);
        assert_eq!(decided_at, buf.len());
        // The largest leaf that still fits is waited for.
        let fits = MAX_SERVER_FLIGHT - offset - 10;
        let mut messages = tls12_hello();
        messages.push(HANDSHAKE_CERTIFICATE);
        messages.extend(u24_bytes(fits + 6));
        messages.extend(u24_bytes(fits + 3));
        messages.extend(u24_bytes(fits));
        assert_eq!(
            inspect_server_flight(&records(&messages, &[])),
            ServerFlight::NeedMore
        );
        // A ServerHello longer than the limit.
        let mut huge = vec![HANDSHAKE_SERVER_HELLO];
        huge.extend(u24_bytes(MAX_SERVER_FLIGHT));
        assert_eq!(
            inspect_server_flight(&record(CONTENT_HANDSHAKE, &huge)),
            ServerFlight::Hidden
        );
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for buf in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"220 mail.example.com ESMTP\r\n",
            b"\x17\x03\x03\x00\x10",     // application data before any hello
            b"\x14\x03\x03\x00\x01\x01", // ChangeCipherSpec before any hello
            b"\x16\x03\x05",             // record version 0x0305
            b"\x16\x02\x00",
            b"\x16\x03\x03\x00\x00", // empty record
            b"\x16\x03\x03\x50\x00", // longer than any record
            b"\x80\x2e\x04\x00",     // SSL 2.0 ServerHello
        ] {
            assert_eq!(
                inspect_server_flight(buf),
                ServerFlight::NotTls,
                "{buf:02x?}"
            );
            fuzz_logic(buf);
        }
    }

    #[test]
    fn malformed_flights_are_not_tls() {
        let (leaf, _) = certificate_der(&["x.example"], &[]);
        let hello = tls12_hello();
        let good_certificate = certificate_message(&[&leaf]);
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        // The first message is not a ServerHello.
        cases.push(("ClientHello", records(&message(1, &[0; 60]), &[])));
        cases.push(("Certificate first", records(&good_certificate, &[])));
        // ServerHello bodies that do not fit.
        cases.push(("short ServerHello", records(&message(2, &[3; 37]), &[])));
        let mut b = hello.clone();
        b[4 + 2 + 32] = 33; // session_id longer than 32
        cases.push(("session id 33", records(&b, &[])));
        let mut b = hello.clone();
        b[4] = 2; // server_version major 2
        cases.push(("version major 2", records(&b, &[])));
        let mut b = server_hello(0x0303, Some(&[(0xff01, vec![0])]));
        b.push(0); // a byte after the extensions
        b[3] += 1;
        cases.push(("trailing byte", records(&b, &[])));
        let mut b = server_hello(0x0303, Some(&[(0xff01, vec![0])]));
        let at = b.len() - 2; // the extension's data length
        b[at] = 9;
        cases.push(("extension past block", records(&b, &[])));
        // After the ServerHello.
        let with = |next: &[u8]| records(&[hello.clone(), next.to_vec()].concat(), &[]);
        cases.push(("unknown message", with(&message(99, &[0; 8]))));
        cases.push(("ClientHello again", with(&message(1, &[0; 40]))));
        let mut b = good_certificate.clone();
        b[3] += 1; // message one byte longer than its list
        b.push(0);
        cases.push(("list shorter than message", with(&b)));
        let mut b = good_certificate.clone();
        b[6] += 1; // list one byte longer than its message
        cases.push(("list longer than message", with(&b)));
        let mut b = good_certificate.clone();
        b[9] += 1; // leaf longer than the list
        cases.push(("leaf past list", with(&b)));
        cases.push((
            "empty leaf",
            with(&message(HANDSHAKE_CERTIFICATE, &[0, 0, 3, 0, 0, 0])),
        ));
        // Records of another type inside a fragmented message.
        let mut b = records(&hello[..20], &[]);
        b.extend(record(CONTENT_ALERT, &[2, 40]));
        cases.push(("alert inside the ServerHello", b));
        let mut b = records(
            &[hello.clone(), good_certificate[..30].to_vec()].concat(),
            &[],
        );
        b.extend(record(CONTENT_CHANGE_CIPHER_SPEC, &[1]));
        cases.push(("ChangeCipherSpec inside the Certificate", b));
        for (name, buf) in cases {
            assert_eq!(check_all_prefixes(&buf).0, ServerFlight::NotTls, "{name}");
        }
    }

    // ---------------------------------------------------------------------
    // Robustness
    // ---------------------------------------------------------------------

    /// xorshift64: a small deterministic PRNG for the property tests.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n.max(1) as u64).expect("fits")
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    #[test]
    fn mutated_flights_keep_their_answers() {
        let (der, key) = certificate_der(&["seed.example"], &["seed.example", "*.seed.example"]);
        let tls12 = server_config(&[&rustls::version::TLS12], &der, &key, None);
        let small = server_config(&[&rustls::version::TLS12], &der, &key, Some(100));
        let tls13 = server_config(&[&rustls::version::TLS13], &der, &key, None);
        let client = client_config(&der);
        let mut hello = tls12_hello();
        hello.extend(message(HANDSHAKE_SERVER_HELLO_DONE, &[]));
        let seeds = [
            handshake(tls12, client.clone(), false),
            handshake(small, client.clone(), false),
            handshake(tls13, client, false),
            records(&hello, &[10]),
        ];
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        let mut seen = [0usize; 4];
        for round in 0..1_500 {
            let mut buf = seeds[round % seeds.len()].clone();
            for _ in 0..=rng.below(3) {
                if buf.is_empty() {
                    break;
                }
                let at = rng.below(buf.len());
                match rng.below(5) {
                    0 => buf[at] = rng.byte(),
                    1 => buf[at] ^= 1 << rng.below(8),
                    2 => buf.truncate(at),
                    3 => buf.insert(at, rng.byte()),
                    _ => {
                        let end = (at + rng.below(16)).min(buf.len());
                        buf.drain(at..end);
                    }
                }
            }
            fuzz_logic(&buf);
            seen[match inspect_server_flight(&buf) {
                ServerFlight::NeedMore => 0,
                ServerFlight::NotTls => 1,
                ServerFlight::Hidden => 2,
                ServerFlight::Names(_) => 3,
            }] += 1;
        }
        // The mutations reach every answer.
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }

    #[test]
    fn random_buffers_do_not_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5_000 {
            let len = rng.below(300);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            if buf.len() >= 9 && rng.below(2) == 0 {
                // A plausible record and ServerHello header.
                buf[..5].copy_from_slice(&[0x16, 0x03, 0x03, 0x00, 0x80]);
                buf[5] = HANDSHAKE_SERVER_HELLO;
                buf[6] = 0;
                buf[7] = 0;
                buf[8] = u8::try_from(38 + rng.below(60)).expect("fits");
            }
            fuzz_logic(&buf);
        }
    }
}
