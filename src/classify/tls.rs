//! Incremental inspection of a TLS ClientHello at the start of a client stream.
//!
//! This module owns the question "does this tunnel start with a TLS
//! ClientHello, and what does it say?". The proxy calls
//! [`inspect_client_hello`] with every byte the client has sent so far, each
//! time more arrive, and gets one of three answers: more bytes are needed,
//! the stream is not TLS (for good), or a complete ClientHello with the
//! fields the classifier uses: SNI, ALPN, ECH/ESNI presence, the offered
//! version and the JA4 fingerprint. The module is pure: no I/O, no state
//! between calls, no panics on any input.
//!
//! What is parsed, and where it is specified:
//! - the record layer, RFC 8446 §5.1: records of content type handshake (22)
//!   with a legacy_record_version of 0x0300..=0x0304 and a non-zero length;
//!   a handshake message may be fragmented over several records, which are
//!   reassembled here;
//! - the ClientHello, RFC 8446 §4.1.2 (and RFC 5246 §7.4.1.2, under which the
//!   extensions block may be absent);
//! - server_name, RFC 6066 §3 (every host_name entry: the RFC allows one,
//!   but a list of several must not let a second name go unseen);
//!   application_layer_protocol_negotiation,
//!   RFC 7301 §3.1; supported_versions, RFC 8446 §4.2.1;
//!   signature_algorithms, RFC 8446 §4.2.3; encrypted_client_hello (0xfe0d,
//!   draft-ietf-tls-esni) and the legacy ESNI extension (0xffce), presence
//!   only; GREASE values, RFC 8701;
//! - JA4, the FoxIO TLS client fingerprint, for TLS over TCP:
//!   <https://github.com/FoxIO-LLC/ja4/blob/main/technical_details/JA4.md>.
//!
//! Strictness: the framing must be consistent: every length prefix must fit
//! its container exactly (a record, the handshake message, the fields of the
//! ClientHello, the extensions block, each extension's data as a whole); a
//! mismatch there makes the stream [`Hello::NotTls`]. Inside one extension's
//! data the parser is as lenient as servers are with extensions they do not
//! need: a malformed ALPN list, signature_algorithms or supported_versions
//! body is ignored (as if the extension carried nothing), and extensions this
//! module does not read (supported_groups, key_share, unknown types) are never
//! looked into. The hello is still [`Hello::Complete`] and JA4 is computed
//! from what parsed, since the extension type itself is on the wire. A
//! malformed server_name body gives no names and sets
//! [`ClientHello::sni_malformed`] (see there why). Contents that are
//! consistently encoded but semantically odd (an empty host name, an empty
//! list) are accepted. Duplicate extensions are accepted; the first
//! well-formed one of each kind is the one used, except server_name, whose
//! host names are all collected. SSL 2.0-compatible hellos (first byte 0x80)
//! are `NotTls`.
//!
//! JA4 follows the text of the specification where the reference
//! implementations have differed: GREASE is dropped from signature_algorithms
//! too, a one-character first ALPN value gives that character twice, and a
//! first ALPN value that starts or ends with a non-alphanumeric byte gives
//! the first and last characters of its hex form.
//!
//! Limits: a ClientHello whose handshake length exceeds [`MAX_CLIENT_HELLO`]
//! is `NotTls`, so at most `MAX_CLIENT_HELLO` + 4 handshake bytes are ever
//! reassembled. Records may be as small as one byte, so a caller that buffers
//! until a decision should allow for up to six times that on the wire; real
//! clients send one record, or a few for post-quantum key shares.

use std::borrow::Cow;
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

/// Outcome of looking at a growing prefix of a client stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not (yet) decidable: the bytes so far are a valid prefix of a TLS handshake record
    /// stream carrying a ClientHello. `need` is a lower bound of how many more bytes are needed.
    NeedMore { need: usize },
    /// The bytes are not a TLS ClientHello (first byte not 0x16, bad record version, first
    /// handshake message not ClientHello, or malformed structure). Decided for good.
    NotTls,
    /// A complete ClientHello was parsed.
    Complete(Box<ClientHello>),
}

/// The fields of a ClientHello that the classifier uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// server_name (type host_name) lower-cased, trailing dot removed; None if absent.
    /// The first such name when the client sent several (logs show this one).
    pub sni: Option<String>,
    /// The further host_name entries, normalised like [`ClientHello::sni`], in
    /// wire order: those after the first in the list, then those of any
    /// repeated server_name extension. RFC 6066 §3 allows one name of each
    /// type, so this is empty (and unallocated) for every ordinary client; a
    /// hello that lists more must have each of them checked, or a permitted
    /// first name could hide a refused second one.
    pub sni_more: Vec<String>,
    /// A server_name extension was present but its body was malformed, so no
    /// name could be read from it. The hello is still complete: servers differ
    /// on such a hello (most refuse it with a decode_error alert, a lenient
    /// one may read a name of its own from it), so refusing it as not-TLS
    /// would break nothing a server accepts and taking it as TLS without a
    /// name keeps every other check (CONNECT authority, ALPN, JA4, addresses).
    /// A caller that refuses hellos without SNI should treat this one the
    /// same way; none of its names are trusted.
    pub sni_malformed: bool,
    /// ALPN protocol ids in order (lossy UTF-8).
    pub alpn: Vec<String>,
    /// Extension 0xfe0d (encrypted_client_hello) present.
    pub ech: bool,
    /// Legacy ESNI extension 0xffce present.
    pub esni: bool,
    /// JA4 fingerprint (FoxIO JA4 spec, TLS over TCP: prefix 't'), e.g. "t13d1516h2_8daaf6152771_e5627efa2ab1".
    /// Empty when [`inspect_client_hello_with`] was asked not to compute it.
    pub ja4: String,
    /// Number of bytes of `buf` consumed by the records carrying the ClientHello.
    pub len: usize,
    /// legacy_version and the highest supported_versions value (GREASE excluded).
    /// That is: the highest non-GREASE supported_versions value if the client
    /// offers one (RFC 8446 §4.2.1), else legacy_version; the version JA4 reports.
    pub version: u16,
}

/// Upper bound on a ClientHello we are willing to buffer (post-quantum key shares make
/// hellos of 1.7-2 KB normal; 16 KiB bounds memory). A hello that claims more is
/// [`Hello::NotTls`].
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// TLS record content type `handshake`.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Record header: type(1), legacy_record_version(2), length(2).
const RECORD_HEADER_LEN: usize = 5;
/// Handshake header: msg_type(1), length(3).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest record payload accepted: 2^14 (RFC 8446 §5.1) plus the 256 bytes
/// of slack that TLS 1.2's TLSCompressed allowed.
const MAX_RECORD_LEN: usize = (1 << 14) + 256;
/// Smallest consistently encoded ClientHello body: legacy_version(2),
/// random(32), and the length bytes of an empty session id(1), cipher suite
/// list(2) and compression method list(1).
const MIN_CLIENT_HELLO: usize = 2 + 32 + 1 + 2 + 1;
/// Longest legacy_session_id (RFC 8446 §4.1.2: `opaque legacy_session_id<0..32>`).
const MAX_SESSION_ID: usize = 32;

const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_SIGNATURE_ALGORITHMS: u16 = 0x000d;
const EXT_ALPN: u16 = 0x0010;
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;
const EXT_ECH: u16 = 0xfe0d;
const EXT_ESNI: u16 = 0xffce;
/// RFC 6066 §3 NameType `host_name`.
const SNI_HOST_NAME: u8 = 0;

/// JA4's stand-in for the hash of an empty list.
const JA4_EMPTY_HASH: &str = "000000000000";

/// Looks at the bytes a client has sent so far (`buf`, growing between calls)
/// and tells whether they start with a TLS ClientHello.
///
/// Any prefix of a valid ClientHello record stream gives [`Hello::NeedMore`];
/// once the records carrying the whole hello are present the answer is
/// [`Hello::Complete`], the same whatever the record fragmentation and
/// whatever follows in `buf`. [`Hello::NotTls`] is final: no longer buffer
/// starting with the same bytes can give anything else.
pub fn inspect_client_hello(buf: &[u8]) -> Hello {
    inspect_client_hello_with(buf, true)
}

/// [`inspect_client_hello`], computing the JA4 fingerprint only when `ja4`
/// is set (otherwise [`ClientHello::ja4`] is empty). Sorting, hex-formatting
/// and hashing the lists is a noticeable share of a tunnel's setup cost,
/// and nothing needs it when no rule matches on JA4 and no log records it.
pub fn inspect_client_hello_with(buf: &[u8], ja4: bool) -> Hello {
    match reassemble(buf) {
        Reassembly::NeedMore(need) => Hello::NeedMore { need },
        Reassembly::NotTls => Hello::NotTls,
        Reassembly::Done {
            message,
            total,
            consumed,
        } => {
            let body = message.get(HANDSHAKE_HEADER_LEN..total).unwrap_or_default();
            match parse_client_hello(body) {
                Some(fields) => Hello::Complete(Box::new(fields.into_client_hello(consumed, ja4))),
                None => Hello::NotTls,
            }
        }
    }
}

/// Entry point for fuzz targets: inspects `data`, its first 64 prefixes and its
/// last 64 prefixes, and checks the invariants the proxy relies on.
///
/// # Panics
///
/// Only if an invariant is violated (that is, on a bug): a prefix said
/// `NotTls` but the whole said otherwise, a prefix said `Complete` but the
/// whole differs, a `NeedMore` asked for nothing or for more bytes than the
/// complete hello turned out to need, or a hello claimed more bytes than given.
pub fn fuzz_logic(data: &[u8]) {
    let whole = inspect_client_hello(data);
    if let Hello::Complete(hello) = &whole {
        assert!(hello.len <= data.len(), "hello longer than its input");
    }
    let head = 0..=data.len().min(64);
    let tail = data.len().saturating_sub(64)..=data.len();
    for cut in head.chain(tail) {
        let prefix = data.get(..cut).unwrap_or_default();
        match inspect_client_hello(prefix) {
            Hello::NotTls => assert_eq!(whole, Hello::NotTls, "NotTls was not final"),
            Hello::Complete(hello) => {
                assert_eq!(
                    whole,
                    Hello::Complete(hello),
                    "Complete changed with more bytes"
                );
            }
            Hello::NeedMore { need } => {
                assert!(need > 0, "NeedMore asked for no bytes");
                if let Hello::Complete(hello) = &whole {
                    assert!(
                        cut.saturating_add(need) <= hello.len,
                        "need was not a lower bound"
                    );
                }
            }
        }
    }
}

/// Result of reassembling the first handshake message from the record stream.
enum Reassembly<'a> {
    NeedMore(usize),
    NotTls,
    /// `message[..total]` is the whole handshake message, header included;
    /// `consumed` is where the record holding its last byte ends.
    Done {
        message: Cow<'a, [u8]>,
        total: usize,
        consumed: usize,
    },
}

/// What a possibly partial record header says.
enum RecordHeader {
    Partial,
    Invalid,
    /// A full, valid header announcing this payload length.
    Full(usize),
}

/// The bytes seen so far cannot start a ClientHello.
struct Malformed;

/// Walks the records at the start of `buf`, concatenating their payloads
/// until the first handshake message is complete (RFC 8446 §5.1).
fn reassemble(buf: &[u8]) -> Reassembly<'_> {
    // Borrowed while the message sits in a single record (the usual case),
    // owned once a second record contributes.
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut pos = 0;
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let record_len = match record_header(rest) {
            RecordHeader::Invalid => return Reassembly::NotTls,
            RecordHeader::Partial => {
                // The message is incomplete (else we would have returned), so
                // this record must bring at least one more byte of it.
                let missing = match missing_message_bytes(&message) {
                    Ok(missing) => missing.max(1),
                    Err(Malformed) => return Reassembly::NotTls,
                };
                let header = RECORD_HEADER_LEN.saturating_sub(rest.len());
                return Reassembly::NeedMore(header.saturating_add(missing));
            }
            RecordHeader::Full(len) => len,
        };
        let available = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let (payload, record_complete) = match available.get(..record_len) {
            Some(payload) => (payload, true),
            None => (available, false),
        };
        if message.is_empty() {
            message = Cow::Borrowed(payload);
        } else {
            message.to_mut().extend_from_slice(payload);
        }
        let total = match handshake_total(&message) {
            Ok(total) => total,
            Err(Malformed) => return Reassembly::NotTls,
        };
        if !record_complete {
            // Lower bound: the rest of this record, and if the message does
            // not end in it, another record header plus the bytes beyond.
            let missing_record = record_len.saturating_sub(payload.len());
            let missing_message = min_total(total).saturating_sub(message.len());
            let need = if missing_message <= missing_record {
                missing_record
            } else {
                missing_message.saturating_add(RECORD_HEADER_LEN)
            };
            return Reassembly::NeedMore(need);
        }
        pos = pos
            .saturating_add(RECORD_HEADER_LEN)
            .saturating_add(record_len);
        if let Some(total) = total {
            if message.len() >= total {
                return Reassembly::Done {
                    message,
                    total,
                    consumed: pos,
                };
            }
        }
    }
}

/// Checks the (possibly partial) record header at the start of `rest`.
fn record_header(rest: &[u8]) -> RecordHeader {
    match rest.first() {
        None => return RecordHeader::Partial,
        Some(&content_type) if content_type != CONTENT_TYPE_HANDSHAKE => {
            return RecordHeader::Invalid
        }
        Some(_) => {}
    }
    // legacy_record_version: 0x0300 ..= 0x0304.
    if rest.get(1).is_some_and(|&major| major != 3) || rest.get(2).is_some_and(|&minor| minor > 4) {
        return RecordHeader::Invalid;
    }
    match *rest {
        [_, _, _, hi, lo, ..] => match usize::from(u16::from_be_bytes([hi, lo])) {
            0 => RecordHeader::Invalid,
            len if len > MAX_RECORD_LEN => RecordHeader::Invalid,
            len => RecordHeader::Full(len),
        },
        [_, _, _, hi] if usize::from(hi) << 8 > MAX_RECORD_LEN => RecordHeader::Invalid,
        _ => RecordHeader::Partial,
    }
}

/// Checks the handshake message bytes gathered so far: the first must be the
/// ClientHello type, and the announced length must be plausible. Returns the
/// total message length (header included) once the header is complete.
fn handshake_total(message: &[u8]) -> Result<Option<usize>, Malformed> {
    match message.first() {
        None => return Ok(None),
        Some(&msg_type) if msg_type != HANDSHAKE_CLIENT_HELLO => return Err(Malformed),
        Some(_) => {}
    }
    // The smallest length the length bytes seen so far allow: missing
    // low-order bytes count as zero.
    let mut length = [0u8; 4];
    for (dst, src) in length.iter_mut().skip(1).zip(message.iter().skip(1)) {
        *dst = *src;
    }
    let length = usize::try_from(u32::from_be_bytes(length)).map_err(|_| Malformed)?;
    if length > MAX_CLIENT_HELLO {
        return Err(Malformed);
    }
    if message.len() < HANDSHAKE_HEADER_LEN {
        return Ok(None);
    }
    if length < MIN_CLIENT_HELLO {
        return Err(Malformed);
    }
    Ok(Some(HANDSHAKE_HEADER_LEN.saturating_add(length)))
}

/// Total message length if known, else the smallest one possible.
fn min_total(total: Option<usize>) -> usize {
    total.unwrap_or(HANDSHAKE_HEADER_LEN + MIN_CLIENT_HELLO)
}

/// Lower bound of the handshake bytes still to come.
fn missing_message_bytes(message: &[u8]) -> Result<usize, Malformed> {
    let total = handshake_total(message)?;
    Ok(min_total(total).saturating_sub(message.len()))
}

/// A cursor over a byte slice whose reads fail instead of running past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&first, tail) = self.rest.split_first()?;
        self.rest = tail;
        Some(first)
    }

    fn u16(&mut self) -> Option<u16> {
        match *self.take(2)? {
            [hi, lo] => Some(u16::from_be_bytes([hi, lo])),
            _ => None,
        }
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

/// Splits a vector of u16 values; `None` if its length is odd.
fn u16_list(bytes: &[u8]) -> Option<Vec<u16>> {
    let chunks = bytes.chunks_exact(2);
    if !chunks.remainder().is_empty() {
        return None;
    }
    Some(
        chunks
            .map(|pair| match *pair {
                [hi, lo] => u16::from_be_bytes([hi, lo]),
                _ => 0,
            })
            .collect(),
    )
}

/// Everything taken from a ClientHello body, before building the public view.
#[derive(Default)]
struct Fields<'a> {
    legacy_version: u16,
    cipher_suites: Vec<u16>,
    /// Extension types in wire order, duplicates and GREASE included.
    extension_types: Vec<u16>,
    /// The first host_name of the well-formed server_name extensions.
    server_name: Option<&'a [u8]>,
    /// Their further host_names, in wire order (empty, unallocated, for a
    /// hello with one name).
    more_server_names: Vec<&'a [u8]>,
    /// A server_name extension whose body did not parse.
    server_name_malformed: bool,
    /// Protocols of the first well-formed ALPN extension.
    alpn: Option<Vec<&'a [u8]>>,
    /// Versions of the first well-formed supported_versions extension.
    supported_versions: Option<Vec<u16>>,
    /// Schemes of the first well-formed signature_algorithms extension.
    signature_algorithms: Option<Vec<u16>>,
}

/// Parses a ClientHello body (RFC 8446 §4.1.2); `None` if the framing is
/// inconsistent: a field or the extensions block that does not fit its
/// container, or an extension whose data runs past the block. Defects inside
/// one extension's data leave that extension out (see the module docs).
fn parse_client_hello(body: &[u8]) -> Option<Fields<'_>> {
    let mut r = Reader::new(body);
    let mut fields = Fields {
        legacy_version: r.u16()?,
        ..Fields::default()
    };
    r.take(32)?; // random
    if r.vec8()?.len() > MAX_SESSION_ID {
        return None;
    }
    fields.cipher_suites = u16_list(r.vec16()?)?;
    r.vec8()?; // legacy_compression_methods
    if r.is_empty() {
        // No extensions block (allowed before TLS 1.3, RFC 5246 §7.4.1.2).
        return Some(fields);
    }
    let mut extensions = Reader::new(r.vec16()?);
    if !r.is_empty() {
        return None;
    }
    while !extensions.is_empty() {
        let ext_type = extensions.u16()?;
        let data = extensions.vec16()?;
        fields.extension_types.push(ext_type);
        // A malformed body leaves the extension out; the first well-formed
        // one of each kind is used, and every server_name contributes.
        match ext_type {
            EXT_SERVER_NAME => match server_name_list(data) {
                Some(list) => {
                    for name in host_names(list) {
                        if fields.server_name.is_none() {
                            fields.server_name = Some(name);
                        } else {
                            fields.more_server_names.push(name);
                        }
                    }
                }
                None => fields.server_name_malformed = true,
            },
            EXT_ALPN if fields.alpn.is_none() => fields.alpn = parse_alpn(data),
            EXT_SUPPORTED_VERSIONS if fields.supported_versions.is_none() => {
                let mut d = Reader::new(data);
                fields.supported_versions = d.vec8().and_then(u16_list).filter(|_| d.is_empty());
            }
            EXT_SIGNATURE_ALGORITHMS if fields.signature_algorithms.is_none() => {
                let mut d = Reader::new(data);
                fields.signature_algorithms = d.vec16().and_then(u16_list).filter(|_| d.is_empty());
            }
            _ => {}
        }
    }
    Some(fields)
}

/// server_name extension data (RFC 6066 §3): the ServerNameList, once every
/// entry of it is checked to be well formed; `None` if it is not.
fn server_name_list(data: &[u8]) -> Option<&[u8]> {
    let mut d = Reader::new(data);
    let list = d.vec16()?;
    if !d.is_empty() {
        return None;
    }
    let mut entries = Reader::new(list);
    while !entries.is_empty() {
        entries.u8()?; // name_type
        entries.vec16()?; // HostName, or the opaque name of another type
    }
    Some(list)
}

/// The host_name entries of a ServerNameList checked by [`server_name_list`],
/// in order (entries of other name types are skipped).
fn host_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut entries = Reader::new(list);
    std::iter::from_fn(move || loop {
        let name_type = entries.u8()?;
        let name = entries.vec16()?;
        if name_type == SNI_HOST_NAME {
            return Some(name);
        }
    })
}

/// ALPN extension data (RFC 7301 §3.1): the protocol names in order.
fn parse_alpn(data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut d = Reader::new(data);
    let mut list = Reader::new(d.vec16()?);
    if !d.is_empty() {
        return None;
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        protocols.push(list.vec8()?);
    }
    Some(protocols)
}

/// Lower-cases a host name and drops one trailing dot; `None` if empty.
fn normalise_host(raw: &[u8]) -> Option<String> {
    let mut host = String::from_utf8_lossy(raw).to_ascii_lowercase();
    if host.ends_with('.') {
        host.pop();
    }
    (!host.is_empty()).then_some(host)
}

/// GREASE values (RFC 8701): 0x0a0a, 0x1a1a, ..., 0xfafa.
fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && value >> 8 == value & 0xff
}

impl Fields<'_> {
    /// The highest non-GREASE supported_versions value, else legacy_version.
    fn version(&self) -> u16 {
        self.supported_versions
            .iter()
            .flatten()
            .copied()
            .filter(|&v| !is_grease(v))
            .max()
            .unwrap_or(self.legacy_version)
    }

    fn into_client_hello(self, consumed: usize, ja4: bool) -> ClientHello {
        let ja4 = if ja4 { self.ja4() } else { String::new() };
        // Names that normalise to nothing (empty, a lone dot) are dropped, so
        // `sni` is the first usable one and `sni_more` holds the rest.
        let mut names = self
            .server_name
            .into_iter()
            .chain(self.more_server_names.iter().copied())
            .filter_map(normalise_host);
        let sni = names.next();
        let sni_more = names.collect();
        ClientHello {
            sni,
            sni_more,
            sni_malformed: self.server_name_malformed,
            alpn: self
                .alpn
                .iter()
                .flatten()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
            ech: self.extension_types.contains(&EXT_ECH),
            esni: self.extension_types.contains(&EXT_ESNI),
            ja4,
            len: consumed,
            version: self.version(),
        }
    }

    /// The three JA4 sections before hashing ("JA4_r"): the prefix, the
    /// sorted cipher list, and the sorted extension list with the signature
    /// algorithms; the two lists are `None` when JA4 stands in zeros for them.
    fn ja4_raw(&self) -> (String, Option<String>, Option<String>) {
        let mut ciphers: Vec<u16> = self
            .cipher_suites
            .iter()
            .copied()
            .filter(|&c| !is_grease(c))
            .collect();
        let extensions: Vec<u16> = self
            .extension_types
            .iter()
            .copied()
            .filter(|&e| !is_grease(e))
            .collect();
        let version = match self.version() {
            0x0304 => "13",
            0x0303 => "12",
            0x0302 => "11",
            0x0301 => "10",
            0x0300 => "s3",
            _ => "00",
        };
        let destination = if extensions.contains(&EXT_SERVER_NAME) {
            'd'
        } else {
            'i'
        };
        let first_alpn = self.alpn.as_ref().and_then(|protocols| protocols.first());
        let prefix = format!(
            "t{version}{destination}{:02}{:02}{}",
            ciphers.len().min(99),
            extensions.len().min(99),
            ja4_alpn(first_alpn.copied()),
        );

        ciphers.sort_unstable();
        let ciphers = (!ciphers.is_empty()).then(|| hex_list(&ciphers));

        let mut hashed: Vec<u16> = extensions
            .into_iter()
            .filter(|&e| e != EXT_SERVER_NAME && e != EXT_ALPN)
            .collect();
        hashed.sort_unstable();
        let extensions = (!hashed.is_empty()).then(|| {
            let mut list = hex_list(&hashed);
            let schemes: Vec<u16> = self
                .signature_algorithms
                .iter()
                .flatten()
                .copied()
                .filter(|&s| !is_grease(s))
                .collect();
            if !schemes.is_empty() {
                list.push('_');
                list.push_str(&hex_list(&schemes));
            }
            list
        });
        (prefix, ciphers, extensions)
    }

    /// The JA4 fingerprint: `{prefix}_{hash12(ciphers)}_{hash12(extensions)}`.
    fn ja4(&self) -> String {
        let (prefix, ciphers, extensions) = self.ja4_raw();
        let hash =
            |list: Option<String>| list.map_or_else(|| JA4_EMPTY_HASH.to_owned(), |l| hash12(&l));
        format!("{prefix}_{}_{}", hash(ciphers), hash(extensions))
    }
}

/// JA4's two ALPN characters: the first and last character of the first
/// protocol if both are ASCII alphanumeric, else the first and last
/// characters of its hex representation; "00" without a (non-empty) protocol.
fn ja4_alpn(first: Option<&[u8]>) -> String {
    let (Some(&head), Some(&tail)) = (first.and_then(<[u8]>::first), first.and_then(<[u8]>::last))
    else {
        return "00".to_owned();
    };
    if head.is_ascii_alphanumeric() && tail.is_ascii_alphanumeric() {
        [char::from(head), char::from(tail)].iter().collect()
    } else {
        let hex = |nibble: u8| char::from_digit(u32::from(nibble), 16).unwrap_or('0');
        [hex(head >> 4), hex(tail & 0x0f)].iter().collect()
    }
}

/// Comma-separated 4-digit lower-case hex.
fn hex_list(values: &[u16]) -> String {
    let mut out = String::with_capacity(values.len().saturating_mul(5));
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{value:04x}");
    }
    out
}

/// The first 12 hex characters of the SHA-256 of `input`.
fn hash12(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(12);
    for byte in digest.iter().take(6) {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---------------------------------------------------------------------
    // Fixture builders
    // ---------------------------------------------------------------------

    /// One extension: type and raw extension_data.
    type Ext = (u16, Vec<u8>);

    /// A ClientHello described field by field (RFC 8446 §4.1.2), plus the
    /// legacy_record_version of the records carrying it.
    #[derive(Clone)]
    struct Spec {
        record_version: u16,
        legacy_version: u16,
        random: [u8; 32],
        session_id: Vec<u8>,
        cipher_suites: Vec<u16>,
        compression_methods: Vec<u8>,
        /// `None`: no extensions block at all (TLS 1.2 and older).
        extensions: Option<Vec<Ext>>,
    }

    impl Default for Spec {
        fn default() -> Self {
            Spec {
                record_version: 0x0301,
                legacy_version: 0x0303,
                random: [0x5a; 32],
                session_id: vec![0x22; 32],
                cipher_suites: vec![0x1301, 0x1302, 0x1303, 0xc02b],
                compression_methods: vec![0],
                extensions: Some(Vec::new()),
            }
        }
    }

    impl Spec {
        fn with_extensions(extensions: Vec<Ext>) -> Self {
            Spec {
                extensions: Some(extensions),
                ..Spec::default()
            }
        }

        /// The ClientHello body, field by field.
        fn body(&self) -> Vec<u8> {
            let mut body = Vec::new();
            body.extend(self.legacy_version.to_be_bytes()); // legacy_version
            body.extend(self.random); // random
            body.extend(vec8(&self.session_id)); // legacy_session_id<0..32>
            body.extend(vec16(&u16s(&self.cipher_suites))); // cipher_suites<2..2^16-2>
            body.extend(vec8(&self.compression_methods)); // legacy_compression_methods<1..2^8-1>
            if let Some(extensions) = &self.extensions {
                let mut block = Vec::new();
                for (ext_type, data) in extensions {
                    block.extend(ext_type.to_be_bytes()); // extension_type
                    block.extend(vec16(data)); // extension_data<0..2^16-1>
                }
                body.extend(vec16(&block)); // extensions<8..2^16-1>
            }
            body
        }

        /// The records carrying the hello, with the given payload sizes and
        /// then one record holding the rest.
        fn records(&self, sizes: &[usize]) -> Vec<u8> {
            records(
                self.record_version,
                &client_hello_message(&self.body()),
                sizes,
            )
        }

        /// The hello in one record.
        fn record(&self) -> Vec<u8> {
            self.records(&[])
        }
    }

    fn vec8(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(bytes.len()).expect("vec8 too long")];
        out.extend_from_slice(bytes);
        out
    }

    fn vec16(bytes: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(bytes.len())
            .expect("vec16 too long")
            .to_be_bytes()
            .to_vec();
        out.extend_from_slice(bytes);
        out
    }

    fn u16s(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    /// A handshake message: msg_type(1), length(3), body.
    fn handshake_message(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len())
            .expect("body too long")
            .to_be_bytes();
        let mut out = vec![msg_type, len[1], len[2], len[3]];
        out.extend_from_slice(body);
        out
    }

    fn client_hello_message(body: &[u8]) -> Vec<u8> {
        handshake_message(HANDSHAKE_CLIENT_HELLO, body)
    }

    /// Handshake records (type 22) carrying `message`: first records with
    /// the payload sizes in `sizes`, then one with whatever is left.
    fn records(version: u16, message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let (payload, tail) = rest.split_at(size.min(rest.len()));
            out.push(CONTENT_TYPE_HANDSHAKE);
            out.extend(version.to_be_bytes());
            out.extend(vec16(payload));
            rest = tail;
        }
        out
    }

    /// One record around an already built handshake body.
    fn wrap(body: &[u8]) -> Vec<u8> {
        records(0x0301, &client_hello_message(body), &[])
    }

    fn sni(names: &[&str]) -> Ext {
        let mut list = Vec::new();
        for name in names {
            list.push(SNI_HOST_NAME); // name_type host_name
            list.extend(vec16(name.as_bytes())); // HostName<1..2^16-1>
        }
        (EXT_SERVER_NAME, vec16(&list)) // server_name_list<1..2^16-1>
    }

    fn alpn(protocols: &[&[u8]]) -> Ext {
        let list: Vec<u8> = protocols.iter().flat_map(|p| vec8(p)).collect();
        (EXT_ALPN, vec16(&list)) // protocol_name_list<2..2^16-1>
    }

    fn supported_versions(versions: &[u16]) -> Ext {
        (EXT_SUPPORTED_VERSIONS, vec8(&u16s(versions))) // versions<2..254>
    }

    fn signature_algorithms(schemes: &[u16]) -> Ext {
        (EXT_SIGNATURE_ALGORITHMS, vec16(&u16s(schemes)))
    }

    fn supported_groups(groups: &[u16]) -> Ext {
        (0x000a, vec16(&u16s(groups)))
    }

    /// key_share (0x0033): one KeyShareEntry per (group, key length).
    fn key_share(shares: &[(u16, usize)]) -> Ext {
        let mut list = Vec::new();
        for &(group, len) in shares {
            list.extend(group.to_be_bytes());
            list.extend(vec16(&vec![0x42; len]));
        }
        (0x0033, vec16(&list))
    }

    fn empty(ext_type: u16) -> Ext {
        (ext_type, Vec::new())
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// First 12 hex characters of SHA-256, computed here independently of
    /// the module's helper.
    fn sha12(input: &str) -> String {
        Sha256::digest(input.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()[..12]
            .to_owned()
    }

    fn complete(buf: &[u8]) -> ClientHello {
        match inspect_client_hello(buf) {
            Hello::Complete(hello) => *hello,
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    /// Feeds every strict prefix (each must be `NeedMore` with a `need` that
    /// is a true lower bound), then the whole buffer (must be `Complete` and
    /// consume all of it), then the buffer followed by more client bytes
    /// (same answer). Returns the hello.
    fn check_all_prefixes(buf: &[u8]) -> ClientHello {
        let hello = complete(buf);
        assert_eq!(hello.len, buf.len(), "len must cover the records");
        for cut in 0..buf.len() {
            match inspect_client_hello(&buf[..cut]) {
                Hello::NeedMore { need } => {
                    assert!(need > 0, "prefix {cut}: need 0");
                    assert!(
                        cut + need <= buf.len(),
                        "prefix {cut}/{}: need {need} overshoots",
                        buf.len()
                    );
                }
                other => panic!("prefix {cut}/{}: {other:?}", buf.len()),
            }
        }
        for trailer in [
            &b"\x17\x03\x03\x00\x02\xaa\xbb"[..], // application data record
            b"\x16\x03\x03\x00\x01\x02",          // another handshake record
            b"GET / HTTP/1.1\r\n",                // anything at all
        ] {
            let mut longer = buf.to_vec();
            longer.extend_from_slice(trailer);
            assert_eq!(complete(&longer), hello, "trailer changed the answer");
        }
        fuzz_logic(buf);
        hello
    }

    /// Every strict prefix is `NeedMore`; the whole is `NotTls` (the defect
    /// can only be seen once the message is complete).
    fn check_not_tls_when_complete(buf: &[u8]) {
        assert_eq!(inspect_client_hello(buf), Hello::NotTls);
        for cut in 0..buf.len() {
            assert!(
                matches!(inspect_client_hello(&buf[..cut]), Hello::NeedMore { .. }),
                "prefix {cut}/{}",
                buf.len()
            );
        }
        fuzz_logic(buf);
    }

    /// Everything `inspect_client_hello` reports, except `len`, which
    /// depends on the framing.
    fn without_len(mut hello: ClientHello) -> ClientHello {
        hello.len = 0;
        hello
    }

    fn ja4_raw_of(spec: &Spec) -> String {
        let body = spec.body();
        let fields = parse_client_hello(&body).expect("parses");
        let (prefix, ciphers, extensions) = fields.ja4_raw();
        format!(
            "{prefix}_{}_{}",
            ciphers.unwrap_or_default(),
            extensions.unwrap_or_default()
        )
    }

    /// A TLS 1.3 hello with SNI, ALPN h2 + http/1.1 and the usual extensions.
    fn modern(host: &str) -> Spec {
        Spec::with_extensions(vec![
            sni(&[host]),
            supported_groups(&[0x001d, 0x0017]),
            signature_algorithms(&[0x0403, 0x0804, 0x0401]),
            alpn(&[b"h2", b"http/1.1"]),
            supported_versions(&[0x0304, 0x0303]),
            key_share(&[(0x001d, 32)]),
        ])
    }

    // ---------------------------------------------------------------------
    // Complete hellos
    // ---------------------------------------------------------------------

    #[test]
    fn sni_and_alpn_h2_http11() {
        let hello = check_all_prefixes(&modern("chat.example.com").record());
        assert_eq!(hello.sni.as_deref(), Some("chat.example.com"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        assert_eq!(hello.version, 0x0304);
        assert!(!hello.ech && !hello.esni);
        // 4 ciphers, 6 extensions; SNI and ALPN leave the hashed list.
        let expected = format!(
            "t13d0406h2_{}_{}",
            sha12("1301,1302,1303,c02b"),
            sha12("000a,000d,002b,0033_0403,0804,0401")
        );
        assert_eq!(hello.ja4, expected);
    }

    #[test]
    fn no_sni() {
        let spec = Spec::with_extensions(vec![
            supported_versions(&[0x0304]),
            alpn(&[b"http/1.1"]),
            key_share(&[(0x001d, 32)]),
        ]);
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.sni, None);
        assert_eq!(hello.alpn, ["http/1.1"]);
        let expected = format!(
            "t13i0403h1_{}_{}",
            sha12("1301,1302,1303,c02b"),
            sha12("002b,0033")
        );
        assert_eq!(hello.ja4, expected);
    }

    #[test]
    fn ech_present() {
        let mut spec = modern("public.example.net");
        // ECHClientHello outer: type 0, kdf 1, aead 1, config_id, enc, payload.
        let mut ech = vec![0, 0, 1, 0, 1, 0x7f];
        ech.extend(vec16(&[0x11; 32]));
        ech.extend(vec16(&[0x22; 144]));
        spec.extensions.as_mut().unwrap().push((EXT_ECH, ech));
        let hello = check_all_prefixes(&spec.record());
        assert!(hello.ech);
        assert!(!hello.esni);
        assert_eq!(hello.sni.as_deref(), Some("public.example.net"));
    }

    #[test]
    fn esni_present() {
        let mut spec = modern("www.example.org");
        spec.extensions
            .as_mut()
            .unwrap()
            .push((EXT_ESNI, vec![0x13, 0x01, 0x00, 0x1d]));
        let hello = check_all_prefixes(&spec.record());
        assert!(hello.esni);
        assert!(!hello.ech);
    }

    #[test]
    fn tls12_only() {
        let spec = Spec {
            record_version: 0x0303,
            cipher_suites: vec![0xc02f, 0xc030, 0x009c],
            extensions: Some(vec![
                sni(&["legacy.example.com"]),
                alpn(&[b"http/1.1"]),
                signature_algorithms(&[0x0401, 0x0501]),
            ]),
            ..Spec::default()
        };
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.version, 0x0303);
        assert_eq!(hello.sni.as_deref(), Some("legacy.example.com"));
        let expected = format!(
            "t12d0303h1_{}_{}",
            sha12("009c,c02f,c030"),
            sha12("000d_0401,0501")
        );
        assert_eq!(hello.ja4, expected);
    }

    #[test]
    fn no_extensions_block() {
        let spec = Spec {
            legacy_version: 0x0301,
            session_id: Vec::new(),
            cipher_suites: vec![0x002f, 0x0035],
            extensions: None,
            ..Spec::default()
        };
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.version, 0x0301);
        assert_eq!(hello.sni, None);
        assert!(hello.alpn.is_empty());
        // No extensions at all: JA4_c is all zeros.
        assert_eq!(
            hello.ja4,
            format!("t10i020000_{}_000000000000", sha12("002f,0035"))
        );
    }

    #[test]
    fn ssl3_and_unknown_versions() {
        for (legacy_version, code) in [(0x0300, "s3"), (0x0302, "11"), (0x7f1c, "00")] {
            let spec = Spec {
                legacy_version,
                extensions: None,
                ..Spec::default()
            };
            let hello = check_all_prefixes(&spec.record());
            assert_eq!(hello.version, legacy_version);
            assert_eq!(&hello.ja4[1..3], code);
        }
    }

    #[test]
    fn ja4_only_when_asked() {
        let record = modern("chat.example.com").record();
        let with = complete(&record);
        let Hello::Complete(without) = inspect_client_hello_with(&record, false) else {
            panic!("not a complete hello");
        };
        assert!(with.ja4.starts_with("t13d"), "{}", with.ja4);
        assert!(without.ja4.is_empty());
        assert_eq!(
            ClientHello {
                ja4: String::new(),
                ..with
            },
            *without
        );
    }

    #[test]
    fn sni_upper_case_and_trailing_dot_normalised() {
        let hello = check_all_prefixes(&modern("Chat.Example.COM.").record());
        assert_eq!(hello.sni.as_deref(), Some("chat.example.com"));
    }

    #[test]
    fn sni_empty_or_not_ascii() {
        // An empty host name: no SNI, but the extension still makes JA4 'd'.
        let hello = check_all_prefixes(&modern("").record());
        assert_eq!(hello.sni, None);
        assert!(hello.ja4.starts_with("t13d"));
        // A lone dot normalises to nothing as well.
        assert_eq!(check_all_prefixes(&modern(".").record()).sni, None);
        // Bytes that are not UTF-8 are replaced, the rest lower-cased.
        let spec = Spec::with_extensions(vec![(
            EXT_SERVER_NAME,
            vec16(&[&[SNI_HOST_NAME][..], &vec16(b"A\xffB.example")].concat()),
        )]);
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.sni.as_deref(), Some("a\u{fffd}b.example"));
    }

    #[test]
    fn sni_without_host_name_entry() {
        // A server_name list holding only an unknown name type.
        let list = [&[7u8][..], &vec16(b"opaque")].concat();
        let spec = Spec::with_extensions(vec![(EXT_SERVER_NAME, vec16(&list))]);
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.sni, None);
        assert!(hello.ja4.starts_with("t12d"));
    }

    #[test]
    fn duplicate_extensions_first_wins() {
        let spec = Spec::with_extensions(vec![
            sni(&["first.example"]),
            alpn(&[b"h2"]),
            sni(&["second.example"]),
            alpn(&[b"http/1.1"]),
            supported_versions(&[0x0304]),
            supported_versions(&[0x0303]),
        ]);
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.sni.as_deref(), Some("first.example"));
        // A second server_name is not dropped: its name is checked too.
        assert_eq!(hello.sni_more, ["second.example"]);
        assert_eq!(hello.alpn, ["h2"]);
        assert_eq!(hello.version, 0x0304);
        // Every occurrence counts, as in the JA4 reference implementation.
        assert!(hello.ja4.starts_with("t13d0406h2_"), "{}", hello.ja4);
        assert!(ja4_raw_of(&spec).ends_with("_002b,002b"));
    }

    #[test]
    fn several_host_names_are_all_seen() {
        let hello = check_all_prefixes(
            &Spec::with_extensions(vec![sni(&["one.example", "Two.Example."])]).record(),
        );
        assert_eq!(hello.sni.as_deref(), Some("one.example"));
        assert_eq!(hello.sni_more, ["two.example"]);
        assert!(!hello.sni_malformed);

        // Three names, an entry of another name type between them, and an
        // empty first name: `sni` is the first usable one.
        let mut list = Vec::new();
        for (name_type, name) in [
            (SNI_HOST_NAME, &b""[..]),
            (SNI_HOST_NAME, b"evil-im.example"),
            (7, b"opaque"),
            (SNI_HOST_NAME, b"www.ok.example"),
            (SNI_HOST_NAME, b"third.example"),
        ] {
            list.push(name_type);
            list.extend(vec16(name));
        }
        let spec = Spec::with_extensions(vec![(EXT_SERVER_NAME, vec16(&list)), alpn(&[b"h2"])]);
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.sni.as_deref(), Some("evil-im.example"));
        assert_eq!(hello.sni_more, ["www.ok.example", "third.example"]);
        assert_eq!(hello.alpn, ["h2"]);

        // One name: nothing more, and nothing allocated for it.
        let hello = complete(&modern("only.example").record());
        assert!(hello.sni_more.is_empty());
        assert_eq!(hello.sni_more.capacity(), 0);
    }

    /// Inside an extension's data, defects leave that extension out and the
    /// hello complete; the framing around it decides whether it is TLS.
    #[test]
    fn malformed_optional_extensions_are_still_tls() {
        let odd_groups = (0x000a, vec![0x00, 0x03, 0x00, 0x1d, 0x00]);
        let garbage_key_share = (0x0033, vec![0xde, 0xad, 0xbe, 0xef, 0x01]);
        let unknown = (0x7e57, vec![0x13, 0x37, 0x00, 0xff, 0x80, 0x42, 0x99]);
        let cases: [(&str, Ext); 9] = [
            ("odd supported_groups", odd_groups),
            ("garbage key_share", garbage_key_share),
            ("unknown type, random bytes", unknown),
            ("alpn name past list", (EXT_ALPN, vec![0, 3, 5, b'h', b'2'])),
            (
                "alpn trailing byte",
                (EXT_ALPN, [alpn(&[b"h2"]).1, vec![0]].concat()),
            ),
            ("alpn empty data", (EXT_ALPN, Vec::new())),
            (
                "odd supported_versions",
                (EXT_SUPPORTED_VERSIONS, vec![3, 3, 4, 3]),
            ),
            (
                "odd signature_algorithms",
                (EXT_SIGNATURE_ALGORITHMS, vec![0, 3, 4, 3, 8]),
            ),
            (
                "signature_algorithms trailing byte",
                (EXT_SIGNATURE_ALGORITHMS, vec![0, 2, 4, 3, 8]),
            ),
        ];
        for (name, bad) in cases {
            let bad_type = bad.0;
            let mut extensions = vec![sni(&["chat.example.com"]), bad];
            if bad_type != EXT_ALPN {
                extensions.push(alpn(&[b"h2", b"http/1.1"]));
            }
            if bad_type != EXT_SIGNATURE_ALGORITHMS {
                extensions.push(signature_algorithms(&[0x0403]));
            }
            if bad_type != EXT_SUPPORTED_VERSIONS {
                extensions.push(supported_versions(&[0x0304, 0x0303]));
            }
            // The bad extension counts like any other.
            let count = extensions.len();
            let spec = Spec::with_extensions(extensions);
            let hello = check_all_prefixes(&spec.record());
            assert_eq!(hello.sni.as_deref(), Some("chat.example.com"), "{name}");
            assert!(!hello.sni_malformed, "{name}");
            let version = if bad_type == EXT_SUPPORTED_VERSIONS {
                "12" // only legacy_version is left
            } else {
                "13"
            };
            let (alpn_chars, alpn_list) = if bad_type == EXT_ALPN {
                ("00", Vec::new())
            } else {
                ("h2", vec!["h2".to_owned(), "http/1.1".to_owned()])
            };
            assert_eq!(hello.alpn, alpn_list, "{name}");
            assert!(
                hello
                    .ja4
                    .starts_with(&format!("t{version}d04{count:02}{alpn_chars}_")),
                "{name}: {}",
                hello.ja4
            );
            // The signature algorithms are in JA4_c unless they were the bad one.
            let raw = ja4_raw_of(&spec);
            assert_eq!(
                raw.ends_with("_0403"),
                bad_type != EXT_SIGNATURE_ALGORITHMS,
                "{name}: {raw}"
            );
            // The same hello fragmented gives the same answer.
            let fragmented = check_all_prefixes(&spec.records(&[20, 30]));
            assert_eq!(without_len(fragmented), without_len(hello), "{name}");
        }
    }

    #[test]
    fn malformed_server_name_is_tls_without_a_name() {
        let cases: [(&str, Vec<u8>); 5] = [
            ("list longer than data", vec![0, 9, 0, 0, 1, b'a']),
            ("name past list", vec![0, 4, 0, 0, 9, b'a']),
            ("trailing byte", [sni(&["a.example"]).1, vec![0]].concat()),
            ("half a list length", vec![0]),
            ("entry without its length", vec![0, 1, 0]),
        ];
        for (name, data) in cases {
            let spec = Spec::with_extensions(vec![
                (EXT_SERVER_NAME, data),
                alpn(&[b"h2"]),
                supported_versions(&[0x0304]),
            ]);
            let hello = check_all_prefixes(&spec.record());
            assert_eq!(hello.sni, None, "{name}");
            assert!(hello.sni_more.is_empty(), "{name}");
            assert!(hello.sni_malformed, "{name}");
            assert_eq!(hello.alpn, ["h2"], "{name}");
            // The extension is there, so JA4 still says 'd'.
            assert!(
                hello.ja4.starts_with("t13d0403h2_"),
                "{name}: {}",
                hello.ja4
            );
        }
        // A well-formed server_name next to a malformed one: its name is
        // read, and the flag still says that one was unreadable.
        let spec = Spec::with_extensions(vec![
            (EXT_SERVER_NAME, vec![0, 9]),
            sni(&["second.example"]),
        ]);
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.sni.as_deref(), Some("second.example"));
        assert!(hello.sni_malformed);
    }

    #[test]
    fn big_key_share_over_1500_bytes() {
        let spec = Spec::with_extensions(vec![
            sni(&["big.example.com"]),
            supported_groups(&[0x11ec, 0x001d, 0x0017]),
            signature_algorithms(&[0x0403, 0x0804, 0x0401]),
            alpn(&[b"h2", b"http/1.1"]),
            supported_versions(&[0x0304, 0x0303]),
            // A 1200-byte post-quantum share next to an x25519 one.
            key_share(&[(0x11ec, 1200), (0x001d, 32)]),
            (0x0015, vec![0; 180]), // padding
        ]);
        let one = spec.record();
        assert!(one.len() > 1500, "{}", one.len());
        let single = check_all_prefixes(&one);
        assert_eq!(single.sni.as_deref(), Some("big.example.com"));

        // The same hello fragmented across 3 records gives the same answer.
        let three = spec.records(&[600, 600]);
        assert_eq!(three.len(), one.len() + 2 * RECORD_HEADER_LEN);
        let fragmented = check_all_prefixes(&three);
        assert_eq!(without_len(fragmented), without_len(single));
    }

    #[test]
    fn record_boundary_splits_handshake_header() {
        let spec = modern("split.example.com");
        let reference = without_len(complete(&spec.record()));
        for sizes in [&[1][..], &[2], &[3], &[4], &[1, 1, 1], &[2, 2], &[3, 100]] {
            let buf = spec.records(sizes);
            let hello = check_all_prefixes(&buf);
            assert_eq!(without_len(hello), reference, "sizes {sizes:?}");
        }
    }

    #[test]
    fn every_fragmentation_gives_the_same_answer() {
        let spec = modern("frag.example.com");
        let reference = without_len(complete(&spec.record()));
        let message_len = client_hello_message(&spec.body()).len();
        for first in 1..message_len {
            let hello = complete(&spec.records(&[first]));
            assert_eq!(without_len(hello), reference, "first record {first}");
        }
        // One-byte records all the way.
        let tiny = spec.records(&vec![1; message_len - 1]);
        assert_eq!(tiny.len(), message_len * (RECORD_HEADER_LEN + 1));
        assert_eq!(without_len(check_all_prefixes(&tiny)), reference);
    }

    #[test]
    fn extra_bytes_in_the_last_record() {
        // A second handshake message after the hello, in the same record:
        // the hello is complete once that record is.
        let spec = modern("extra.example.com");
        let mut message = client_hello_message(&spec.body());
        message.extend(handshake_message(20, &[0; 12]));
        let buf = records(0x0301, &message, &[]);
        let hello = check_all_prefixes(&buf);
        assert_eq!(hello.sni.as_deref(), Some("extra.example.com"));
    }

    #[test]
    fn grease_is_ignored() {
        let spec = Spec {
            cipher_suites: vec![0x0a0a, 0x1301, 0xfafa],
            extensions: Some(vec![
                (0x1a1a, Vec::new()),
                sni(&["grease.example"]),
                supported_versions(&[0x2a2a, 0x0304, 0x0303]),
                signature_algorithms(&[0x3a3a, 0x0403]),
                alpn(&[b"h2"]),
                (0xdada, vec![0]),
            ]),
            ..Spec::default()
        };
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.version, 0x0304);
        assert_eq!(
            hello.ja4,
            format!("t13d0104h2_{}_{}", sha12("1301"), sha12("000d,002b_0403"))
        );
        // Only GREASE versions: fall back to legacy_version.
        let spec = Spec::with_extensions(vec![supported_versions(&[0x7a7a])]);
        assert_eq!(check_all_prefixes(&spec.record()).version, 0x0303);
        // Only GREASE ciphers: JA4_b is all zeros.
        let spec = Spec {
            cipher_suites: vec![0x4a4a],
            ..Spec::default()
        };
        assert!(
            check_all_prefixes(&spec.record())
                .ja4
                .starts_with("t12i0000")
                && complete(&spec.record()).ja4.contains("_000000000000_")
        );
    }

    #[test]
    fn grease_values() {
        let grease: Vec<u16> = (0..16u16)
            .map(|i| (i << 12) | 0x0a00 | (i << 4) | 0x0a)
            .collect();
        assert_eq!(grease.first(), Some(&0x0a0a));
        assert_eq!(grease.last(), Some(&0xfafa));
        assert!(grease.iter().all(|&g| is_grease(g)));
        let count = (0..=u16::MAX).filter(|&v| is_grease(v)).count();
        assert_eq!(count, 16);
        for not in [0x0a1a, 0x0b0b, 0xaaab, 0x0000, 0x1301, 0xa0a0] {
            assert!(!is_grease(not), "{not:#06x}");
        }
    }

    #[test]
    fn ja4_alpn_characters() {
        // The examples of the JA4 specification ("ALPN Extension Value").
        assert_eq!(ja4_alpn(Some(b"h2")), "h2");
        assert_eq!(ja4_alpn(Some(b"http/1.1")), "h1");
        assert_eq!(ja4_alpn(Some(&[0xab])), "ab");
        assert_eq!(ja4_alpn(Some(&[0xab, 0xcd])), "ad");
        assert_eq!(ja4_alpn(Some(&[0x30, 0xab])), "3b");
        assert_eq!(ja4_alpn(Some(&[0x30, 0x31, 0xab, 0xcd])), "3d");
        assert_eq!(ja4_alpn(Some(&[0x30, 0xab, 0xcd, 0x31])), "01");
        // A single character is both first and last; empty or absent is 00.
        assert_eq!(ja4_alpn(Some(b"x")), "xx");
        assert_eq!(ja4_alpn(Some(b"")), "00");
        assert_eq!(ja4_alpn(None), "00");
    }

    #[test]
    fn empty_alpn_value_and_list() {
        let hello = check_all_prefixes(&Spec::with_extensions(vec![alpn(&[b""])]).record());
        assert_eq!(hello.alpn, [""]);
        assert_eq!(&hello.ja4[8..10], "00");
        let hello = check_all_prefixes(&Spec::with_extensions(vec![alpn(&[])]).record());
        assert!(hello.alpn.is_empty());
        assert_eq!(&hello.ja4[8..10], "00");
    }

    #[test]
    fn counts_are_capped_at_99() {
        let spec = Spec {
            cipher_suites: (1..=120).collect(),
            extensions: Some((0x0100..0x0100 + 110).map(empty).collect()),
            ..Spec::default()
        };
        let hello = check_all_prefixes(&spec.record());
        assert!(hello.ja4.starts_with("t12i999900_"), "{}", hello.ja4);
    }

    #[test]
    fn only_sni_and_alpn_extensions() {
        // Nothing left to hash in JA4_c.
        let spec = Spec::with_extensions(vec![sni(&["a.example"]), alpn(&[b"h2"])]);
        let hello = check_all_prefixes(&spec.record());
        assert!(hello.ja4.starts_with("t12d0402h2_"));
        assert!(hello.ja4.ends_with("_000000000000"));
    }

    // ---------------------------------------------------------------------
    // JA4 against published values
    // ---------------------------------------------------------------------

    /// The worked example of the JA4 specification (technical_details/JA4.md,
    /// "Example" and "Raw Output"): its ciphers and extensions in their
    /// original order (JA4_ro) give t13d1516h2_8daaf6152771_e5627efa2ab1.
    fn spec_example(signature_schemes: &[u16]) -> Spec {
        let extensions = [
            0x001b, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002d, 0x000d, 0x0005, 0x0023, 0x0012,
            0x002b, 0xff01, 0x000b, 0x000a, 0x0015,
        ]
        .into_iter()
        .map(|ext_type| match ext_type {
            EXT_SERVER_NAME => sni(&["example.com"]),
            EXT_ALPN => alpn(&[b"h2", b"http/1.1"]),
            EXT_SUPPORTED_VERSIONS => supported_versions(&[0x0304, 0x0303]),
            EXT_SIGNATURE_ALGORITHMS => signature_algorithms(signature_schemes),
            other => empty(other),
        })
        .collect();
        Spec {
            cipher_suites: vec![
                0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
                0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
            ],
            extensions: Some(extensions),
            ..Spec::default()
        }
    }

    const SPEC_SIGNATURE_SCHEMES: [u16; 8] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ];

    #[test]
    fn ja4_specification_example() {
        let spec = spec_example(&SPEC_SIGNATURE_SCHEMES);
        assert_eq!(
            ja4_raw_of(&spec),
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,\
             cca9_0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,\
             0804,0401,0503,0805,0501,0806,0601"
        );
        let hello = check_all_prefixes(&spec.record());
        assert_eq!(hello.ja4, "t13d1516h2_8daaf6152771_e5627efa2ab1");
        // The specification's full hash of the extension string, too.
        let digest: String = Sha256::digest(
            "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,\
             0401,0503,0805,0501,0806,0601",
        )
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
        assert_eq!(
            digest,
            "e5627efa2ab19723084c1033a96c694a45826ab5a460d2d3fd5ffcfe97161c95"
        );
    }

    #[test]
    fn ja4_specification_example_without_signature_algorithms() {
        // "If there are no signature algorithms in the hello packet, then the
        // string ends without an underscore": ... = 6d807ffa2a79.
        let hello = check_all_prefixes(&spec_example(&[]).record());
        assert_eq!(hello.ja4, "t13d1516h2_8daaf6152771_6d807ffa2a79");
    }

    /// A Chrome 143 (Android) ClientHello as published field by field by
    /// tls.browserleaks.com together with its JA4 and JA4_r: GREASE in four
    /// places, ECH, and a 1216-byte X25519MLKEM768 key share. Key material and
    /// the ECH payload are filler of the published lengths; JA4 does not see
    /// them.
    fn chrome_143() -> Spec {
        let mut ech = vec![0]; // ECHClientHelloType outer
        ech.extend([0x00, 0x01, 0x00, 0x01]); // HKDF-SHA256, AES-128-GCM
        ech.push(254); // config_id
        ech.extend(vec16(&[0x33; 32])); // enc
        ech.extend(vec16(&[0x44; 144])); // payload
        let alps = vec16(&vec8(b"h2")); // application_settings: supported_protocols
        Spec {
            record_version: 0x0301,
            legacy_version: 0x0303,
            random: hex("65428825bd3030d23fc6d8dcb95b6d68aba7c3310c7db2cef588f07b6b26cb99")
                .try_into()
                .unwrap(),
            session_id: hex("26c4ed1789251c138e9fac1ee6cf415c5c3da06f38f90fdb404fda0afb799e7d"),
            cipher_suites: vec![
                0xaaaa, 4865, 4866, 4867, 49195, 49199, 49196, 49200, 52393, 52392, 49171, 49172,
                156, 157, 47, 53,
            ],
            compression_methods: vec![0],
            extensions: Some(vec![
                empty(19018),                                     // GREASE 0x4a4a
                (45, vec8(&[1])),                                 // psk_key_exchange_modes
                key_share(&[(14906, 1), (4588, 1216), (29, 32)]), // GREASE, MLKEM, x25519
                alpn(&[b"h2", b"http/1.1"]),
                (65037, ech), // encrypted_client_hello
                empty(23),    // extended_main_secret
                (17613, alps),
                sni(&["tls-outer.browserleaks.com"]),
                (11, vec8(&[0])), // ec_point_formats
                supported_groups(&[14906, 4588, 29, 23, 24]),
                supported_versions(&[27242, 772, 771]),
                (65281, vec8(&[])),       // renegotiation_info
                empty(35),                // session_ticket
                empty(18),                // signed_certificate_timestamp
                (5, vec![1, 0, 0, 0, 0]), // status_request: ocsp
                signature_algorithms(&[1027, 2052, 1025, 1283, 2053, 1281, 2054, 1537]),
                (27, vec8(&u16s(&[2]))), // compress_certificate: brotli
                (27242, vec![0]),        // GREASE 0x6a6a
            ]),
        }
    }

    #[test]
    fn ja4_published_chrome_143() {
        let spec = chrome_143();
        assert_eq!(
            ja4_raw_of(&spec),
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,\
             cca9_0005,000a,000b,000d,0012,0017,001b,0023,002b,002d,0033,44cd,fe0d,ff01_0403,\
             0804,0401,0503,0805,0501,0806,0601"
        );
        let one = spec.record();
        assert!(one.len() > 1500, "{}", one.len());
        let hello = check_all_prefixes(&one);
        assert_eq!(hello.ja4, "t13d1516h2_8daaf6152771_d8a2da3f94cd");
        assert_eq!(hello.sni.as_deref(), Some("tls-outer.browserleaks.com"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        assert_eq!(hello.version, 0x0304);
        assert!(hello.ech);
        assert!(!hello.esni);

        // Fragmented across 3 records, the last boundary inside the key share.
        let three = check_all_prefixes(&spec.records(&[500, 700]));
        assert_eq!(without_len(three), without_len(hello));
    }

    // ---------------------------------------------------------------------
    // Not TLS
    // ---------------------------------------------------------------------

    #[test]
    fn other_protocols_are_not_tls() {
        for buf in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n",
            b"\x05\x01\x00", // SOCKS5
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(inspect_client_hello(buf), Hello::NotTls, "{buf:?}");
            // Decided on the first byte.
            assert_eq!(inspect_client_hello(&buf[..1]), Hello::NotTls);
            fuzz_logic(buf);
        }
    }

    #[test]
    fn prefixes_of_nothing_need_more() {
        assert!(matches!(inspect_client_hello(&[]), Hello::NeedMore { need } if need > 0));
        assert!(matches!(inspect_client_hello(&[0x16]), Hello::NeedMore { need } if need >= 4));
        assert!(matches!(
            inspect_client_hello(&[0x16, 0x03, 0x01]),
            Hello::NeedMore { .. }
        ));
    }

    #[test]
    fn bad_record_headers() {
        for header in [
            &[0x16, 0x03, 0x01, 0x00, 0x00][..], // zero length
            &[0x16, 0x03, 0x05],                 // version 0x0305
            &[0x16, 0x03, 0xff],
            &[0x16, 0x02, 0x00], // SSL 2-ish major
            &[0x16, 0x04],
            &[0x17, 0x03, 0x03, 0x00, 0x10], // application data
            &[0x15, 0x03, 0x03, 0x00, 0x02], // alert
            &[0x16, 0x03, 0x03, 0x41, 0x01], // 2^14 + 257 bytes
            &[0x16, 0x03, 0x03, 0x42],       // ditto, seen from the first byte
            &[0x16, 0x03, 0x03, 0xff, 0xff],
        ] {
            assert_eq!(inspect_client_hello(header), Hello::NotTls, "{header:02x?}");
        }
        // The largest record length accepted.
        assert!(matches!(
            inspect_client_hello(&[0x16, 0x03, 0x03, 0x41, 0x00, 0x01]),
            Hello::NeedMore { .. }
        ));
        // Record version 0x0305 around an otherwise valid hello.
        let mut buf = modern("example.com").record();
        buf[2] = 0x05;
        assert_eq!(inspect_client_hello(&buf), Hello::NotTls);
        // SSL 3.0 and TLS 1.3 record versions are fine.
        for version in [0x0300, 0x0304] {
            let spec = Spec {
                record_version: version,
                ..modern("example.com")
            };
            check_all_prefixes(&spec.record());
        }
    }

    #[test]
    fn first_handshake_message_must_be_client_hello() {
        // ServerHello (type 2): decided as soon as the type byte is seen.
        let server_hello = records(0x0303, &handshake_message(2, &modern("x").body()), &[]);
        assert_eq!(inspect_client_hello(&server_hello), Hello::NotTls);
        assert_eq!(inspect_client_hello(&server_hello[..6]), Hello::NotTls);
        // Finished, Certificate, HelloRequest.
        for msg_type in [0, 11, 20] {
            let buf = records(0x0303, &handshake_message(msg_type, &[0; 60]), &[]);
            assert_eq!(inspect_client_hello(&buf), Hello::NotTls);
        }
    }

    #[test]
    fn handshake_length_limits() {
        // Exactly MAX_CLIENT_HELLO (padded with extension 0x0015) is fine.
        let mut spec = modern("pad.example.com");
        let base = spec.body().len() + 4; // plus the padding extension header
        spec.extensions
            .as_mut()
            .unwrap()
            .push((0x0015, vec![0; MAX_CLIENT_HELLO - base]));
        assert_eq!(spec.body().len(), MAX_CLIENT_HELLO);
        let hello = complete(&spec.record());
        assert_eq!(
            hello.len,
            RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + MAX_CLIENT_HELLO
        );
        fuzz_logic(&spec.records(&[9000]));

        // One byte more is refused, as soon as the length is readable.
        spec.extensions
            .as_mut()
            .unwrap()
            .last_mut()
            .unwrap()
            .1
            .push(0);
        let buf = spec.record();
        assert_eq!(inspect_client_hello(&buf), Hello::NotTls);
        assert_eq!(inspect_client_hello(&buf[..9]), Hello::NotTls);
        // A first length byte of 1 already means at least 64 KiB.
        assert_eq!(
            inspect_client_hello(&[0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0x01]),
            Hello::NotTls
        );
        // Shorter than any ClientHello can be.
        let buf = records(
            0x0301,
            &handshake_message(1, &[0; MIN_CLIENT_HELLO - 1]),
            &[],
        );
        assert_eq!(inspect_client_hello(&buf), Hello::NotTls);
        assert_eq!(inspect_client_hello(&buf[..9]), Hello::NotTls);
    }

    #[test]
    fn other_record_types_between_fragments() {
        let spec = modern("example.com");
        let message = client_hello_message(&spec.body());
        let mut buf = records(0x0301, &message[..40], &[]);
        buf.extend([0x14, 0x03, 0x03, 0x00, 0x01, 0x01]); // change_cipher_spec
        buf.extend(records(0x0301, &message[40..], &[]));
        assert_eq!(inspect_client_hello(&buf), Hello::NotTls);
    }

    #[test]
    fn inconsistent_lengths_inside_a_complete_message() {
        let good = modern("example.com").body();
        // legacy_version(2) random(32) session_id(1 + 32), then cipher_suites.
        let sid = 2 + 32;
        let cs = sid + 1 + 32;
        let after_cs = cs + 2 + 8;
        let exts = after_cs + 2; // compression methods: 1, 0
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

        let mut b = good.clone();
        b[sid] = 33; // session id longer than 32 (and than what follows)
        cases.push(("session id length 33", b));

        let mut b = good.clone();
        b[cs + 1] = 7; // odd cipher suites length
        cases.push(("odd cipher suites", b));

        let mut b = good.clone();
        b[cs] = 0xff; // cipher suites run past the end
        cases.push(("cipher suites past the end", b));

        let mut b = good.clone();
        b[after_cs] = 200; // compression methods run past the end
        cases.push(("compression past the end", b));

        let mut b = good.clone();
        b[exts + 1] += 1; // extensions block one byte longer than the body
        cases.push(("extensions block too long", b));

        let mut b = good.clone();
        b[exts + 1] -= 1; // one byte too short: the last extension is cut
        cases.push(("extensions block too short", b));

        let mut b = good.clone();
        b.push(0); // a byte after the extensions block
        cases.push(("trailing byte", b));

        let mut b = good.clone();
        b.truncate(exts + 1); // half an extensions length
        cases.push(("half a length", b));

        // An extension whose data runs past the block.
        let mut b = Spec::with_extensions(vec![empty(0x0017)]).body();
        let at = b.len() - 1;
        b[at] = 1;
        cases.push(("extension data past block", b));

        for (name, body) in cases {
            let buf = wrap(&body);
            assert_eq!(inspect_client_hello(&buf), Hello::NotTls, "{name}");
            check_not_tls_when_complete(&buf);
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
            usize::try_from(self.next() % n.max(1) as u64).unwrap()
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    #[test]
    fn random_buffers_do_not_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = rng.below(400);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            // Give most buffers a plausible record and handshake header so
            // that the parser, not just the first byte, gets exercised.
            let style = rng.below(4);
            if style >= 1 && buf.len() >= 5 {
                buf[0] = 0x16;
                buf[1] = 0x03;
                buf[2] = rng.byte() % 5;
                let record_len = u16::try_from(rng.below(buf.len())).unwrap().max(1);
                buf[3..5].copy_from_slice(&record_len.to_be_bytes());
            }
            if style >= 2 && buf.len() >= 9 {
                buf[5] = 1;
                buf[6] = 0;
                let hs_len = u16::try_from(rng.below(buf.len())).unwrap();
                buf[7..9].copy_from_slice(&hs_len.to_be_bytes());
            }
            fuzz_logic(&buf);
        }
    }

    #[test]
    fn mutated_hellos_do_not_panic() {
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        let seeds = [
            chrome_143().record(),
            chrome_143().records(&[3, 900]),
            modern("seed.example").record(),
            spec_example(&SPEC_SIGNATURE_SCHEMES).records(&[100]),
            Spec {
                extensions: None,
                ..Spec::default()
            }
            .record(),
        ];
        let mut decided = [0usize; 3];
        for round in 0..2_000 {
            let mut buf = seeds[round % seeds.len()].clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(buf.len());
                match rng.below(6) {
                    0 => buf[at] = rng.byte(),
                    1 => buf[at] ^= 1 << rng.below(8),
                    2 => buf.truncate(at),
                    3 => buf.insert(at, rng.byte()),
                    4 => {
                        let end = (at + rng.below(16)).min(buf.len());
                        buf.drain(at..end);
                    }
                    _ => buf[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)],
                }
            }
            fuzz_logic(&buf);
            match inspect_client_hello(&buf) {
                Hello::NeedMore { .. } => decided[0] += 1,
                Hello::NotTls => decided[1] += 1,
                Hello::Complete(_) => decided[2] += 1,
            }
        }
        // The mutations reach all three answers.
        assert!(decided.iter().all(|&n| n > 0), "{decided:?}");
    }
}
