//! HTTP/1.x message framing followed from the bytes as they pass (RFC 9112
//! §6 and §7), for streams that are relayed byte for byte and never
//! re-encoded: where each request's head and body end, so that every
//! request of a keep-alive or pipelined connection is inspected where it
//! starts, and where each response ends, so that a refusal page is written
//! only between responses.
//!
//! This module owns the framing rules and the chunked-coding follower. It
//! leaves decisions to `decide` and sockets to `proxy`.
//!
//! Strictness, where it matters: a relay that sees a message end at another
//! byte than the server does lets a hidden request through uninspected
//! (request smuggling). So whatever the two sides could read differently is
//! refused as [`Lost`] instead of guessed: Transfer-Encoding together with
//! Content-Length (RFC 9112 §6.3 ¶3 says to handle it as an error; a relay
//! that cannot rewrite cannot remove the Content-Length either), a request
//! Transfer-Encoding that does not end in `chunked` (§6.3 ¶4), differing or
//! malformed Content-Length values (§6.3 ¶5), chunk sizes that overflow,
//! bare LF in chunk framing, and over-long chunk or trailer lines. The
//! caller decides what a lost stream gets (the generic rules).

/// Why a stream cannot be followed as HTTP/1.x any further.
pub type Lost = &'static str;

/// Longest chunk-size line (size, extensions, CRLF) or trailer line
/// followed. hyper's own bound on chunk extensions is 16 KiB in total.
pub const MAX_LINE: usize = 4096;
/// Most trailer bytes followed after the last chunk.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body: the next message starts right after the head.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked transfer coding (RFC 9112 §7.1).
    Chunked,
    /// Until the connection closes (responses only, RFC 9112 §6.3 ¶8).
    UntilClose,
}

/// The last value of header `name` among `headers`, and how many there are.
fn values<'h, 'b>(
    headers: &'h [httparse::Header<'b>],
    name: &'static str,
) -> impl Iterator<Item = &'b [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Comma-separated list elements of every value of `name`, trimmed, empty
/// elements skipped (RFC 9110 §5.6.1).
pub fn list<'h, 'b>(
    headers: &'h [httparse::Header<'b>],
    name: &'static str,
) -> impl Iterator<Item = &'b [u8]> + 'h {
    values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Does the head carry Transfer-Encoding at all?
pub fn has_te(headers: &[httparse::Header<'_>]) -> bool {
    values(headers, "transfer-encoding").next().is_some()
}

/// Is `chunked` the final coding, and only there?
fn te_is_chunked(headers: &[httparse::Header<'_>]) -> Result<bool, ()> {
    let mut codings = list(headers, "transfer-encoding").peekable();
    let mut last_chunked = false;
    while let Some(c) = codings.next() {
        let chunked = c.eq_ignore_ascii_case(b"chunked");
        if chunked && codings.peek().is_some() {
            // chunked applied twice, or not last: RFC 9112 §6.1.
            return Err(());
        }
        last_chunked = chunked;
    }
    Ok(last_chunked)
}

/// The Content-Length, if any: every value (and list element) must be the
/// same decimal number.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, Lost> {
    let mut found: Option<u64> = None;
    for v in values(headers, "content-length") {
        for part in v.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err("malformed Content-Length");
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(m) if m != n => return Err("differing Content-Length values"),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// How a request's body is delimited (RFC 9112 §6.3 ¶4–¶7).
pub fn request_body(req: &httparse::Request<'_, '_>) -> Result<Body, Lost> {
    let te = has_te(req.headers);
    let cl = content_length(req.headers)?;
    if te {
        if cl.is_some() {
            return Err("both Transfer-Encoding and Content-Length");
        }
        if req.version == Some(0) {
            // RFC 9112 §6.1: HTTP/1.0 has no transfer codings.
            return Err("Transfer-Encoding in an HTTP/1.0 request");
        }
        return match te_is_chunked(req.headers) {
            Ok(true) => Ok(Body::Chunked),
            _ => Err("request Transfer-Encoding does not end in chunked"),
        };
    }
    Ok(match cl {
        Some(0) | None => Body::None,
        Some(n) => Body::Length(n),
    })
}

/// Does the request switch protocols after it (RFC 9110 §7.8): an Upgrade
/// field with `upgrade` among the Connection options?
pub fn is_upgrade(req: &httparse::Request<'_, '_>) -> bool {
    values(req.headers, "upgrade").next().is_some()
        && list(req.headers, "connection").any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

/// Does the client wait for `100 Continue` before it sends the body (RFC
/// 9110 §10.1.1)?
pub fn expects_continue(req: &httparse::Request<'_, '_>) -> bool {
    list(req.headers, "expect").any(|t| t.eq_ignore_ascii_case(b"100-continue"))
}

/// Does the request offer a switch to HTTP/2 over cleartext (`h2c`, RFC
/// 7540 §3.2), which would carry further requests past per-request
/// inspection?
pub fn offers_h2c(req: &httparse::Request<'_, '_>) -> bool {
    list(req.headers, "upgrade").any(|t| t.eq_ignore_ascii_case(b"h2c"))
}

/// What the request a response answers was: it decides the response's
/// framing (RFC 9112 §6.3 ¶1–¶2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked {
    pub head: bool,
    pub connect: bool,
    /// The request offered a protocol switch (Upgrade).
    pub upgrade: bool,
}

/// How a response is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// 1xx other than 101: the final response is still to come.
    Interim,
    /// A final response with this body.
    Final(Body),
    /// 101, or a 2xx to CONNECT: what follows is not HTTP.
    Switch,
}

/// The framing of a response to `asked`.
pub fn response_body(asked: Asked, resp: &httparse::Response<'_, '_>) -> Result<Reply, Lost> {
    let status = resp.code.unwrap_or(0);
    if status == 101 || (asked.connect && (200..300).contains(&status)) {
        return Ok(Reply::Switch);
    }
    if (100..200).contains(&status) {
        return Ok(Reply::Interim);
    }
    if asked.head || status == 204 || status == 304 {
        return Ok(Reply::Final(Body::None));
    }
    if has_te(resp.headers) {
        // The transfer coding overrides any Content-Length; a coding that
        // is not chunked last reads until close (RFC 9112 §6.3 ¶3–¶4).
        return Ok(Reply::Final(match te_is_chunked(resp.headers) {
            Ok(true) => Body::Chunked,
            _ => Body::UntilClose,
        }));
    }
    Ok(Reply::Final(match content_length(resp.headers)? {
        Some(0) => Body::None,
        Some(n) => Body::Length(n),
        None => Body::UntilClose,
    }))
}

/// Where a body follower stands after some input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All the input belongs to the body, which goes on.
    More,
    /// The body ended after this many bytes of the input.
    Ended(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of the chunk size.
    Size {
        digits: u8,
        size: u64,
    },
    /// After the size's digits: optional whitespace, then `;` or CR.
    AfterSize {
        size: u64,
    },
    /// Inside chunk extensions, up to CR.
    Ext {
        size: u64,
    },
    /// The LF of the size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
}

/// The chunked coding followed byte by byte (RFC 9112 §7.1), without
/// buffering: the caller hands over whatever arrived and is told where the
/// body ends. Data bytes can be observed on the way (to inspect the start
/// of a body).
#[derive(Debug, Clone)]
pub struct Chunked {
    state: Chunk,
    /// Bytes of the current size or trailer line.
    line: usize,
    /// Trailer bytes so far.
    trailers: usize,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: Chunk::Size { digits: 0, size: 0 },
            line: 0,
            trailers: 0,
        }
    }
}

impl Chunked {
    /// Follow `input`; `data` sees every run of chunk data.
    pub fn advance(&mut self, input: &[u8], data: &mut dyn FnMut(&[u8])) -> Result<Progress, Lost> {
        let mut at = 0;
        while at < input.len() {
            let b = input[at];
            match self.state {
                Chunk::Data { left } => {
                    let take = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    data(&input[at..at + take]);
                    at += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data { left }
                    };
                    continue;
                }
                Chunk::Size { digits, size } => {
                    self.line += 1;
                    if let Some(d) = (b as char).to_digit(16) {
                        if digits >= 15 {
                            return Err("chunk size too large");
                        }
                        self.state = Chunk::Size {
                            digits: digits + 1,
                            size: size << 4 | u64::from(d),
                        };
                    } else if digits == 0 {
                        return Err("malformed chunk size");
                    } else {
                        self.state = Chunk::AfterSize { size };
                        continue; // look at this byte after the size
                    }
                }
                Chunk::AfterSize { size } => {
                    // Only optional whitespace, then an extension or the
                    // line's end (RFC 9112 §7.1.1): `0x46` is not a last
                    // chunk with an extension `x46` to a server that reads
                    // sizes with a lenient parser.
                    self.line += 1;
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = Chunk::Ext { size },
                        b'\r' => self.state = Chunk::SizeLf { size },
                        b'\n' => return Err("bare LF in chunk framing"),
                        _ => return Err("malformed chunk size"),
                    }
                }
                Chunk::Ext { size } => {
                    self.line += 1;
                    match b {
                        b'\r' => self.state = Chunk::SizeLf { size },
                        b'\n' => return Err("bare LF in chunk framing"),
                        _ => {}
                    }
                }
                Chunk::SizeLf { size } => {
                    if b != b'\n' {
                        return Err("bare CR in chunk framing");
                    }
                    self.line = 0;
                    self.state = if size == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data { left: size }
                    };
                }
                Chunk::DataCr => {
                    if b != b'\r' {
                        return Err("chunk data longer than its size");
                    }
                    self.state = Chunk::DataLf;
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err("bare CR in chunk framing");
                    }
                    self.state = Chunk::Size { digits: 0, size: 0 };
                }
                Chunk::TrailerStart => {
                    self.line = 1;
                    self.trailers += 1;
                    self.state = match b {
                        b'\r' => Chunk::TrailerLf { empty: true },
                        b'\n' => return Err("bare LF in trailers"),
                        _ => Chunk::TrailerLine,
                    };
                }
                Chunk::TrailerLine => {
                    self.line += 1;
                    self.trailers += 1;
                    match b {
                        b'\r' => self.state = Chunk::TrailerLf { empty: false },
                        b'\n' => return Err("bare LF in trailers"),
                        _ => {}
                    }
                }
                Chunk::TrailerLf { empty } => {
                    if b != b'\n' {
                        return Err("bare CR in trailers");
                    }
                    if empty {
                        return Ok(Progress::Ended(at + 1));
                    }
                    self.trailers += 1;
                    self.state = Chunk::TrailerStart;
                }
            }
            if self.line > MAX_LINE {
                return Err("chunk or trailer line too long");
            }
            if self.trailers > MAX_TRAILERS {
                return Err("trailers too long");
            }
            at += 1;
        }
        Ok(Progress::More)
    }
}

/// A body being followed.
#[derive(Debug, Clone)]
pub enum Following {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Following {
    /// `None` for a message without a body.
    pub fn new(body: Body) -> Option<Following> {
        match body {
            Body::None | Body::Length(0) => None,
            Body::Length(n) => Some(Following::Length(n)),
            Body::Chunked => Some(Following::Chunked(Chunked::default())),
            Body::UntilClose => Some(Following::UntilClose),
        }
    }

    /// Follow `input`; `data` sees the body's data (decoded).
    pub fn advance(&mut self, input: &[u8], data: &mut dyn FnMut(&[u8])) -> Result<Progress, Lost> {
        match self {
            Following::Length(left) => {
                let take = (input.len() as u64).min(*left);
                data(&input[..take as usize]);
                *left -= take;
                Ok(if *left == 0 {
                    Progress::Ended(take as usize)
                } else {
                    Progress::More
                })
            }
            Following::Chunked(c) => c.advance(input, data),
            Following::UntilClose => {
                data(input);
                Ok(Progress::More)
            }
        }
    }
}

/// The start of a body that begins at `input[0]`, decoded, up to `window`
/// bytes: the data, and whether the body ended within `input`.
pub fn body_prefix(body: Body, input: &[u8], window: usize) -> Result<(Vec<u8>, bool), Lost> {
    let Some(mut f) = Following::new(body) else {
        return Ok((Vec::new(), true));
    };
    let mut out = Vec::new();
    let progress = f.advance(input, &mut |d| {
        let room = window.saturating_sub(out.len());
        out.extend_from_slice(&d[..d.len().min(room)]);
    });
    match progress {
        Ok(p) => Ok((out, matches!(p, Progress::Ended(_)))),
        // Framing that breaks past the window is the body follower's to
        // find, once the head is decided.
        Err(_) if out.len() >= window => Ok((out, false)),
        Err(why) => Err(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req_body(head: &[u8]) -> Result<Body, Lost> {
        let mut h = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut h);
        assert!(r.parse(head).expect("head").is_complete());
        request_body(&r)
    }

    fn resp(asked: Asked, head: &[u8]) -> Result<Reply, Lost> {
        let mut h = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut h);
        assert!(r.parse(head).expect("head").is_complete());
        response_body(asked, &r)
    }

    #[test]
    fn request_framing_follows_rfc_9112_section_6_3() {
        let cases: &[(&[u8], Result<Body, Lost>)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", Ok(Body::None)),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Ok(Body::None),
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 12\r\n\r\n",
                Ok(Body::Length(12)),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ok(Body::Length(5)),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Ok(Body::Length(5)),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err("differing Content-Length values"),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                Err("malformed Content-Length"),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
                Err("malformed Content-Length"),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Err("malformed Content-Length"),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(Body::Chunked),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n",
                Ok(Body::Chunked),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(Body::Chunked),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Err("request Transfer-Encoding does not end in chunked"),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                Err("request Transfer-Encoding does not end in chunked"),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Err("both Transfer-Encoding and Content-Length"),
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err("Transfer-Encoding in an HTTP/1.0 request"),
            ),
        ];
        for (head, want) in cases {
            assert_eq!(req_body(head), *want, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn response_framing_depends_on_the_request_and_status() {
        let get = Asked::default();
        let head = Asked {
            head: true,
            ..Asked::default()
        };
        let connect = Asked {
            connect: true,
            ..Asked::default()
        };
        let cases: &[(Asked, &[u8], Result<Reply, Lost>)] = &[
            (
                get,
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                Ok(Reply::Final(Body::Length(3))),
            ),
            (
                head,
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                Ok(Reply::Final(Body::None)),
            ),
            (
                get,
                b"HTTP/1.1 204 No Content\r\n\r\n",
                Ok(Reply::Final(Body::None)),
            ),
            (
                get,
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                Ok(Reply::Final(Body::None)),
            ),
            (get, b"HTTP/1.1 100 Continue\r\n\r\n", Ok(Reply::Interim)),
            (
                get,
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                Ok(Reply::Switch),
            ),
            (connect, b"HTTP/1.1 200 OK\r\n\r\n", Ok(Reply::Switch)),
            (
                connect,
                b"HTTP/1.1 407 No\r\nContent-Length: 0\r\n\r\n",
                Ok(Reply::Final(Body::None)),
            ),
            (
                get,
                b"HTTP/1.1 200 OK\r\n\r\n",
                Ok(Reply::Final(Body::UntilClose)),
            ),
            (
                get,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Ok(Reply::Final(Body::Chunked)),
            ),
            (
                get,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Ok(Reply::Final(Body::UntilClose)),
            ),
            (
                get,
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                Err("malformed Content-Length"),
            ),
        ];
        for (asked, head, want) in cases {
            assert_eq!(
                resp(*asked, head),
                *want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    /// Follow `input` fed in pieces of `step` bytes; the data seen and
    /// where it ended.
    fn follow(input: &[u8], step: usize) -> (Vec<u8>, Result<Option<usize>, Lost>) {
        let mut c = Chunked::default();
        let mut data = Vec::new();
        let mut at = 0;
        while at < input.len() {
            let piece = &input[at..(at + step).min(input.len())];
            match c.advance(piece, &mut |d| data.extend_from_slice(d)) {
                Ok(Progress::More) => at += piece.len(),
                Ok(Progress::Ended(n)) => return (data, Ok(Some(at + n))),
                Err(e) => return (data, Err(e)),
            }
        }
        (data, Ok(None))
    }

    #[test]
    fn chunked_bodies_end_where_the_last_chunk_and_trailers_end() {
        let body = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        for step in 1..=body.len() {
            let (data, r) = follow(body, step);
            assert_eq!(r, Ok(Some(end)), "step {step}");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
        }
        let (_, r) = follow(b"0\r\n\r\n", 1);
        assert_eq!(r, Ok(Some(5)));
        let (_, r) = follow(b"3\r\nabc\r\n", 2);
        assert_eq!(r, Ok(None), "not ended yet");
    }

    #[test]
    fn chunked_framing_that_servers_could_read_differently_is_lost() {
        let bad: &[(&[u8], Lost)] = &[
            (b"x\r\n", "malformed chunk size"),
            (b"\r\n", "malformed chunk size"),
            (b"5\nhello\r\n", "bare LF in chunk framing"),
            (b"5\r\nhelloX\r\n", "chunk data longer than its size"),
            (b"5\r\nhello\rX", "bare CR in chunk framing"),
            (b"10000000000000000\r\n", "chunk size too large"),
            (b"0x46\r\n", "malformed chunk size"),
            (b"5 x\r\nhello\r\n", "malformed chunk size"),
            (b"0\r\nTrailer\n", "bare LF in trailers"),
        ];
        for (input, why) in bad {
            assert_eq!(
                follow(input, 1).1,
                Err(*why),
                "{}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(follow(input, input.len()).1, Err(*why));
        }
        let mut long = b"1;".to_vec();
        long.resize(MAX_LINE + 10, b'a');
        assert_eq!(follow(&long, 100).1, Err("chunk or trailer line too long"));
    }

    #[test]
    fn body_prefix_decodes_up_to_the_window() {
        assert_eq!(
            body_prefix(Body::Chunked, b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", 4),
            Ok((b"abcd".to_vec(), true))
        );
        assert_eq!(
            body_prefix(Body::Length(10), b"abc", 8),
            Ok((b"abc".to_vec(), false))
        );
        assert_eq!(
            body_prefix(Body::Length(3), b"abcdef", 8),
            Ok((b"abc".to_vec(), true))
        );
        assert_eq!(body_prefix(Body::None, b"abc", 8), Ok((Vec::new(), true)));
    }

    #[test]
    fn upgrades_and_h2c_offers_are_recognised() {
        let parse = |head: &[u8], f: fn(&httparse::Request<'_, '_>) -> bool| {
            let mut h = [httparse::EMPTY_HEADER; 16];
            let mut r = httparse::Request::new(&mut h);
            assert!(r.parse(head).expect("head").is_complete());
            f(&r)
        };
        let ws = b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(parse(ws, is_upgrade));
        assert!(!parse(ws, offers_h2c));
        let h2c = b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: websocket, H2C\r\n\r\n";
        assert!(parse(h2c, offers_h2c));
        let no_conn = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
        assert!(!parse(no_conn, is_upgrade));
    }
}
