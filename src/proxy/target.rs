//! Request targets, read strictly, and the CONNECT port rule. Pure: the
//! explicit front end and the tunnel call these before any lookup or
//! connection, so a target they refuse never reaches DNS or an upstream.
//!
//! The `http` crate parses a request target leniently where a proxy must
//! not: a port above 65535 or an empty port reads as "no port" (and would
//! fall back to 80), and userinfo is kept. Here every port written must be
//! 1-65535, and userinfo is refused (RFC 9110 §4.2.4: a recipient SHOULD
//! treat its presence as an error; it is used to disguise the authority).
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::config::PortSet;

use super::refuse::FlowError;

/// The port written in an authority (`host`, `host:port`, `[v6]:port`):
/// `None` when none is written. Userinfo, an empty port, a port that is
/// not all digits, 0 and anything above 65535 are errors.
pub fn authority_port(authority: &str) -> Result<Option<u16>, FlowError> {
    if authority.contains('@') {
        return Err(FlowError::BadRequest(
            "userinfo (user@) in the request target",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (_, rest) = v6
            .split_once(']')
            .ok_or(FlowError::BadRequest("unclosed [ in the request target"))?;
        match rest.strip_prefix(':') {
            Some(port) => ("[]", Some(port)),
            None if rest.is_empty() => ("[]", None),
            None => return Err(FlowError::BadRequest("junk after ] in the request target")),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(FlowError::BadRequest("no host in the request target"));
    }
    let Some(port) = port else {
        return Ok(None);
    };
    parse_port(port).map(Some)
}

/// A port as written: digits only, 1-65535 (leading zeros allowed, as
/// RFC 3986 §3.2.3 `port = *DIGIT` reads them).
fn parse_port(text: &str) -> Result<u16, FlowError> {
    if text.is_empty() {
        return Err(FlowError::BadRequest("empty port in the request target"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FlowError::BadRequest("the port is not a number"));
    }
    let digits = text.trim_start_matches('0');
    if digits.is_empty() {
        return Err(FlowError::BadRequest("port 0"));
    }
    if digits.len() > 5 {
        return Err(FlowError::BadRequest("port above 65535"));
    }
    u16::try_from(digits.parse::<u32>().unwrap_or(u32::MAX))
        .map_err(|_| FlowError::BadRequest("port above 65535"))
}

/// The port of an absolute-form `http://` target; 80 when none is written.
pub fn http_port(uri: &http::Uri) -> Result<u16, FlowError> {
    let authority = uri
        .authority()
        .ok_or(FlowError::BadRequest("no host in the request target"))?;
    Ok(authority_port(authority.as_str())?.unwrap_or(80))
}

/// The port of a CONNECT target (authority-form, RFC 9112 §3.2.3:
/// `host:port`, the port required).
pub fn connect_port(authority: &http::uri::Authority) -> Result<u16, FlowError> {
    authority_port(authority.as_str())?.ok_or(FlowError::BadRequest(
        "CONNECT needs an explicit, non-zero port",
    ))
}

/// May a CONNECT reach `port` (`[access] connect_ports`)? A refusal is
/// counted and logged as app `unidentified`, reason `port`: the proxy's own
/// access rule refused it, not a signature.
pub fn check_connect_port(allowed: &PortSet, port: u16) -> Result<(), FlowError> {
    if allowed.contains(port) {
        Ok(())
    } else {
        Err(FlowError::PortNotAllowed(port))
    }
}

/// How a `connect_ports` refusal is counted and logged.
pub fn port_refusal() -> Detection {
    Detection {
        app: UNIDENTIFIED,
        rule: None,
        reason: Reason::Port,
        offset: None,
        exception: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_read_strictly() {
        let ok: &[(&str, Option<u16>)] = &[
            ("example.test", None),
            ("example.test:80", Some(80)),
            ("example.test:65535", Some(65535)),
            ("example.test:0443", Some(443)),
            ("127.0.0.1:8080", Some(8080)),
            ("[::1]", None),
            ("[::1]:443", Some(443)),
            ("[2001:db8::1]:1", Some(1)),
        ];
        for (a, want) in ok {
            assert_eq!(authority_port(a).ok(), Some(*want), "{a}");
        }
        for a in [
            "example.test:99999",
            "example.test:65536",
            "example.test:70000",
            "example.test:4294967376",
            "example.test:",
            "example.test:0",
            "example.test:000",
            "example.test:8o",
            "example.test:+80",
            "example.test:-80",
            "example.test: 80",
            "example.test:80:80",
            "user@example.test",
            "user:pass@example.test:80",
            "@example.test",
            ":80",
            "",
            "[::1",
            "[::1]80",
            "[::1]:",
            "[::1]:99999",
        ] {
            assert!(authority_port(a).is_err(), "{a} was accepted");
        }
    }

    #[test]
    fn connect_needs_a_port_and_http_defaults_to_80() {
        let auth: http::uri::Authority = "example.test:443".parse().expect("authority");
        assert_eq!(connect_port(&auth).ok(), Some(443));
        let auth: http::uri::Authority = "example.test".parse().expect("authority");
        assert!(connect_port(&auth).is_err());
        let uri: http::Uri = "http://example.test/x".parse().expect("uri");
        assert_eq!(http_port(&uri).ok(), Some(80));
        let uri: http::Uri = "http://example.test:8080/x".parse().expect("uri");
        assert_eq!(http_port(&uri).ok(), Some(8080));
        // What the `http` crate reads as "no port" is refused here.
        for t in ["http://example.test:99999/", "http://example.test:/"] {
            if let Ok(uri) = t.parse::<http::Uri>() {
                assert_eq!(uri.port_u16(), None, "{t}");
                assert!(http_port(&uri).is_err(), "{t}");
            }
        }
    }

    #[test]
    fn connect_ports_refuse_what_they_do_not_list() {
        let only_443 = PortSet::from_ranges(vec![(443, 443)]);
        assert!(check_connect_port(&only_443, 443).is_ok());
        for p in [1, 80, 442, 444, 5222, 8443, 65535] {
            assert!(matches!(
                check_connect_port(&only_443, p),
                Err(FlowError::PortNotAllowed(q)) if q == p
            ));
        }
    }
}
