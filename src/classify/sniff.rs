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

/// Request methods a proxy forwards (RFC 9110 §9).
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

/// Classify the start of a client stream.
pub fn sniff(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => return Sniff::NeedMore,
        Some(0x16) => return Sniff::Tls,
        _ => {}
    }
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if buf.len() < m.len() {
                return Sniff::NeedMore;
            }
            let mut headers = [httparse::EMPTY_HEADER; 0];
            let mut req = httparse::Request::new(&mut headers);
            return match req.parse(buf) {
                Ok(_) | Err(httparse::Error::TooManyHeaders) => Sniff::Http,
                Err(_) => Sniff::Other,
            };
        }
    }
    Sniff::Other
}

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
            (b"GETX", Sniff::Other),
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
