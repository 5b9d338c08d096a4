//! What the first bytes of a client stream are: a TLS record, an HTTP/1.x
//! request, or something else. Shared by the tunnels and `classify pcap`.

/// What the first client bytes look like so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Too few bytes to say.
    NeedMore,
    /// A TLS handshake record starts here (a ClientHello, if anything).
    Tls,
    /// An HTTP/1.x request line (the head may still be partial).
    Http,
    /// Neither.
    Other,
}

/// Request methods common enough to be recognised from their first bytes
/// (RFC 9110 §9); any other method token is recognised once its request
/// line is whole.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Longest request line looked at for a method that is not in [`METHODS`]
/// (WebDAV's PROPFIND, MKCOL, REPORT...; caches' PURGE).
const MAX_LINE: usize = 8192;

/// Classify the start of a client stream.
pub fn sniff(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => return Sniff::NeedMore,
        Some(0x16) => return Sniff::Tls,
        _ => {}
    }
    // A server ignores empty lines before a request line (RFC 9112 §2.2).
    let start = buf
        .iter()
        .take(8)
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len().min(8));
    let line = &buf[start..];
    if line.is_empty() {
        return if start < 8 {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    }
    let request_line = |line: &[u8]| {
        let mut headers = [httparse::EMPTY_HEADER; 0];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(line) {
            Ok(_) | Err(httparse::Error::TooManyHeaders) => Sniff::Http,
            Err(_) => Sniff::Other,
        }
    };
    for m in METHODS {
        let n = line.len().min(m.len());
        if line[..n] == m[..n] {
            if line.len() < m.len() {
                return Sniff::NeedMore;
            }
            return request_line(line);
        }
    }
    // Another method: upper-case letters (as every registered method is:
    // WebDAV's PROPFIND, MKCOL, VERSION-CONTROL...), then the rest of a
    // whole request line with an HTTP/1.x version. Line protocols (SMTP,
    // IRC, POP3) have a word and a space too, but never the version; and
    // anything else (lower case, digits) is not held waiting.
    let token = line.iter().take_while(|&&b| is_method_char(b)).count();
    match line.get(token) {
        None if token < MAX_METHOD => Sniff::NeedMore,
        Some(b' ') if token > 0 => match line.iter().position(|&b| b == b'\n') {
            Some(_) => request_line(line),
            None if line.len() < MAX_LINE => Sniff::NeedMore,
            None => Sniff::Other,
        },
        _ => Sniff::Other,
    }
}

/// A character of a method name as methods are registered (RFC 9110 §16.1:
/// tokens; in practice upper-case letters, `-` and `_`).
fn is_method_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// Longest method name waited for.
const MAX_METHOD: usize = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_table() {
        let cases: &[(&[u8], Sniff)] = &[
            (b"", Sniff::NeedMore),
            (b"\x16", Sniff::Tls),
            (b"G", Sniff::NeedMore),
            (b"GE", Sniff::NeedMore),
            (b"GET ", Sniff::Http),
            (b"GET / HTTP/1.1\r\n", Sniff::Http),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Sniff::Http),
            (b"GETX", Sniff::NeedMore),
            (b"GETX / HTTP/1.1\r\n", Sniff::Http),
            (b"PROPFIND /", Sniff::NeedMore),
            (b"PROPFIND /dav/ HTTP/1.1\r\nDepth: 1\r\n", Sniff::Http),
            (b"\r\nGET / HTTP/1.1\r\n", Sniff::Http),
            (b"\r\n", Sniff::NeedMore),
            (b"EHLO mail.example.org\r\n", Sniff::Other),
            (b"NICK chatter\r\nUSER chatter 0 * :x\r\n", Sniff::Other),
            (b"0123456789abcdef0123456789abcdef0123", Sniff::Other),
            (b"ping-1", Sniff::Other),
            (b"MKCOL", Sniff::NeedMore),
            (b"MKCOL /a/ HTTP/1.1\r\n", Sniff::Http),
            (b"SSH-2.0-OpenSSH\r\n", Sniff::Other),
            (b"PASS x\r\n", Sniff::Other),
            (b"POST /api HTTP/1.1\r\n", Sniff::Http),
            (b"GET /\x00 HTTP/1.1\r\n", Sniff::Other),
            (b"<stream:stream", Sniff::Other),
        ];
        for (input, want) in cases {
            assert_eq!(sniff(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
