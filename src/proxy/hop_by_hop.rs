//! Hop-by-hop fields (RFC 9110 §7.6.1): what a forwarding proxy removes
//! from a message before passing it on, and nothing more. The rest of the
//! header block keeps its order; the names keep the case they came with
//! (hyper's `HeaderCaseMap` travels beside the map, in the extensions).
//!
//! `HeaderMap::remove` swap-removes, so a removal moves the last field into
//! the hole: fields are removed here by rebuilding the map in order.
//!
//! Left in place on purpose:
//! - `Transfer-Encoding` and `Content-Length`: hyper decodes the framing on
//!   one side and writes it again on the other, where the field stands (it
//!   adds `chunked` when needed and drops it for an HTTP/1.0 peer);
//! - `Trailer`: end to end (RFC 9110 §6.6.2), and hyper only passes on
//!   trailer fields a `Trailer` field announces.
//!
//! An `h2c` upgrade offer (RFC 9113 §3.1 leaves it out; RFC 7540 §3.2 had
//! it) is never passed on: the origin could answer `101` and switch the
//! connection to HTTP/2, which this proxy does not inspect. The offer's
//! `HTTP2-Settings` field goes with it.
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields removed whether or not `Connection` names them (lower case).
pub const ALWAYS_REMOVED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

/// Fields `Connection` may not remove: the framing, which the next hop
/// reads, and Host (a `Connection: content-length` must not change how the
/// message is read downstream).
pub const PROTECTED: &[&str] = &["host", "content-length", "transfer-encoding"];

/// Is `name` (any case) one of `set` (lower case)?
pub fn is_one_of(set: &[&str], name: &str) -> bool {
    set.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn always_removed(name: &HeaderName) -> bool {
    ALWAYS_REMOVED.contains(&name.as_str())
}

fn protected(name: &HeaderName) -> bool {
    PROTECTED.contains(&name.as_str())
}

/// The comma-separated tokens of a field's values (empty ones skipped).
fn tokens<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> impl Iterator<Item = &'a str> {
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Is `protocol` (an Upgrade token, `name[/version]`) h2c?
fn is_h2c(protocol: &str) -> bool {
    let name = protocol.split('/').next().unwrap_or("");
    name.trim().eq_ignore_ascii_case("h2c")
}

/// Rebuild `headers` in order with what `keep` returns for each field:
/// `None` drops it, `Some(value)` keeps it with that value.
fn rebuild(
    headers: &mut HeaderMap,
    mut keep: impl FnMut(&HeaderName, HeaderValue) -> Option<HeaderValue>,
) {
    let old = std::mem::replace(headers, HeaderMap::with_capacity(headers.len()));
    let mut current: Option<HeaderName> = None;
    for (name, value) in old {
        if let Some(n) = name {
            current = Some(n);
        }
        // `into_iter` names the first value of each field.
        let Some(name) = current.as_ref() else {
            continue;
        };
        if let Some(v) = keep(name, value) {
            headers.append(name.clone(), v);
        }
    }
}

/// Does any field need removing? One pass over the names; most heads have
/// none of these, and then nothing is rebuilt.
fn any_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(always_removed)
}

/// The fields `Connection` names (lower case), besides the protected ones.
fn named_by_connection(headers: &HeaderMap) -> Vec<String> {
    tokens(headers.get_all(header::CONNECTION).iter())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn is_named(named: &[String], name: &HeaderName) -> bool {
    !protected(name) && named.iter().any(|n| n == name.as_str())
}

/// Remove every hop-by-hop field: Connection and the fields it names,
/// Keep-Alive, Proxy-Connection, TE, Upgrade, Proxy-Authorization,
/// Proxy-Authenticate, HTTP2-Settings. The others keep their order.
pub fn strip(headers: &mut HeaderMap) {
    if !any_hop_by_hop(headers) {
        return;
    }
    let named = named_by_connection(headers);
    rebuild(headers, |name, value| {
        (!always_removed(name) && !is_named(&named, name)).then_some(value)
    });
}

/// Remove a request's hop-by-hop fields, keeping an upgrade offer (RFC 9110
/// §7.8: `Connection: upgrade` and `Upgrade`) without its `h2c` protocol.
/// Returns whether the request still asks to upgrade; if so, its
/// `Connection` field (where the first one stood) is just the client's
/// `upgrade` token, and its `Upgrade` fields list what is left of the offer.
pub fn strip_request(headers: &mut HeaderMap) -> bool {
    if !any_hop_by_hop(headers) {
        return false;
    }
    let named = named_by_connection(headers);
    // The client's spelling of the upgrade token, if Connection has one.
    let upgrade_token = tokens(headers.get_all(header::CONNECTION).iter())
        .find(|t| t.eq_ignore_ascii_case("upgrade"))
        .and_then(|t| HeaderValue::from_str(t).ok());
    // What the Upgrade fields offer besides h2c, field by field.
    let offers: Vec<Option<HeaderValue>> = headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| {
            let all: Vec<&str> = tokens(std::iter::once(v)).collect();
            if !all.iter().any(|t| is_h2c(t)) {
                return (!all.is_empty()).then(|| v.clone());
            }
            let rest: Vec<&str> = all.into_iter().filter(|t| !is_h2c(t)).collect();
            if rest.is_empty() {
                None
            } else {
                HeaderValue::from_str(&rest.join(", ")).ok()
            }
        })
        .collect();
    let upgrading = upgrade_token.is_some() && offers.iter().any(Option::is_some);
    let mut offers = offers.into_iter();
    let mut connection = upgrade_token.filter(|_| upgrading);
    rebuild(headers, |name, value| {
        if name == header::CONNECTION {
            // One Connection field, where the first stood.
            return connection.take();
        }
        if name == header::UPGRADE {
            let offer = offers.next().flatten();
            return offer.filter(|_| upgrading);
        }
        (!always_removed(name) && !is_named(&named, name)).then_some(value)
    });
    upgrading
}

/// Remove a response's hop-by-hop fields. A `101 Switching Protocols`
/// keeps its Connection and Upgrade fields as sent: the client needs them
/// to switch.
pub fn strip_response(headers: &mut HeaderMap, switching: bool) {
    if !switching {
        return strip(headers);
    }
    if !any_hop_by_hop(headers) {
        return;
    }
    let named = named_by_connection(headers);
    rebuild(headers, |name, value| {
        let kept = name == header::CONNECTION
            || name == header::UPGRADE
            || !always_removed(name) && !is_named(&named, name);
        kept.then_some(value)
    });
}

/// A response framed by Transfer-Encoding loses any Content-Length beside
/// it (RFC 9112 §6.3 ¶3: a message with both is read by the coding, and an
/// intermediary must remove the length before forwarding it). hyper would
/// otherwise write the body under the length, and abort the response when
/// the body runs past it. The other fields keep their order.
pub fn drop_length_beside_coding(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        rebuild(headers, |name, value| {
            (name != header::CONTENT_LENGTH).then_some(value)
        });
    }
}

/// Does a `101` switch only to protocols the request offered (RFC 9110
/// §7.8)? `offered` holds the request's Upgrade fields as sent upstream.
pub fn switches_to_offered(offered: &[HeaderValue], response: &HeaderMap) -> bool {
    let name = |p: &str| {
        p.split('/')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    let offered: Vec<String> = tokens(offered.iter()).map(name).collect();
    let mut switched = tokens(response.get_all(header::UPGRADE).iter()).peekable();
    switched.peek().is_some() && switched.all(|p| offered.contains(&name(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map from (name, value) pairs in order, as hyper builds it.
    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn pairs(h: &HeaderMap) -> Vec<(String, String)> {
        h.iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or("?").to_string(),
                )
            })
            .collect()
    }

    fn want(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_length_beside_a_coding_goes_and_the_order_stays() {
        let mut h = map(&[
            ("a", "1"),
            ("content-length", "2"),
            ("b", "2"),
            ("transfer-encoding", "chunked"),
            ("c", "3"),
        ]);
        drop_length_beside_coding(&mut h);
        assert_eq!(
            pairs(&h),
            want(&[
                ("a", "1"),
                ("b", "2"),
                ("transfer-encoding", "chunked"),
                ("c", "3")
            ])
        );
        // A length alone stays.
        let mut h = map(&[("content-length", "2"), ("x", "1")]);
        drop_length_beside_coding(&mut h);
        assert_eq!(pairs(&h), want(&[("content-length", "2"), ("x", "1")]));
    }

    #[test]
    fn hop_by_hop_fields_go_and_the_rest_keep_their_order() {
        let mut h = map(&[
            ("host", "a.example"),
            ("connection", "keep-alive, X-Secret"),
            ("x-first", "1"),
            ("x-secret", "s"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eDp5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("accept", "*/*"),
            ("x-last", "2"),
        ]);
        strip(&mut h);
        assert_eq!(
            pairs(&h),
            want(&[
                ("host", "a.example"),
                ("x-first", "1"),
                ("accept", "*/*"),
                ("x-last", "2"),
            ])
        );
        // No hop-by-hop field: untouched.
        let mut h = map(&[("x-secret", "1"), ("accept", "*/*")]);
        strip(&mut h);
        assert_eq!(pairs(&h), want(&[("x-secret", "1"), ("accept", "*/*")]));
    }

    #[test]
    fn connection_cannot_remove_the_framing_or_host() {
        let mut h = map(&[
            ("host", "a.example"),
            ("content-length", "3"),
            (
                "connection",
                "Content-Length, Host, Transfer-Encoding, Trailer",
            ),
            ("trailer", "x-sum"),
        ]);
        strip(&mut h);
        assert_eq!(
            pairs(&h),
            want(&[("host", "a.example"), ("content-length", "3")])
        );
        let mut h = map(&[
            ("transfer-encoding", "chunked"),
            ("trailer", "x-sum"),
            ("keep-alive", "1"),
        ]);
        strip(&mut h);
        assert_eq!(
            pairs(&h),
            want(&[("transfer-encoding", "chunked"), ("trailer", "x-sum")])
        );
    }

    #[test]
    fn repeated_fields_keep_their_order() {
        let mut h = map(&[
            ("x-a", "1"),
            ("connection", "close"),
            ("x-b", "2"),
            ("x-a", "3"),
            ("connection", "x-gone"),
            ("x-gone", "4"),
        ]);
        strip(&mut h);
        // HeaderMap groups a name's values at its first place (hyper writes
        // them so); their own order is kept (RFC 9110 §5.3).
        assert_eq!(pairs(&h), want(&[("x-a", "1"), ("x-a", "3"), ("x-b", "2")]));
    }

    #[test]
    fn h2c_offers_are_dropped_websocket_offers_kept() {
        // (request fields, still upgrading, fields sent upstream)
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [(&'a str, &'a str)]);
        let cases: &[Case] = &[
            (
                &[
                    ("Host", "a"),
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c"),
                    ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
                    ("accept", "*/*"),
                ],
                false,
                &[("host", "a"), ("accept", "*/*")],
            ),
            (
                &[
                    ("connection", "HTTP2-Settings, upgrade"),
                    ("upgrade", "H2C"),
                    ("http2-settings", "x"),
                ],
                false,
                &[],
            ),
            (
                &[
                    ("connection", "keep-alive, Upgrade"),
                    ("x-a", "1"),
                    ("upgrade", "h2c, websocket"),
                    ("http2-settings", "x"),
                    ("sec-websocket-key", "k"),
                ],
                true,
                &[
                    ("connection", "Upgrade"),
                    ("x-a", "1"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", "k"),
                ],
            ),
            (
                &[
                    ("upgrade", "websocket"),
                    ("connection", "Upgrade"),
                    ("upgrade", "h2c/1"),
                ],
                true,
                &[("upgrade", "websocket"), ("connection", "Upgrade")],
            ),
            (
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
                true,
                &[("connection", "Upgrade"), ("upgrade", "websocket")],
            ),
            // Upgrade without Connection: upgrade is no offer (RFC 9110 §7.8).
            (
                &[("upgrade", "websocket"), ("x-a", "1")],
                false,
                &[("x-a", "1")],
            ),
            // Connection: upgrade without an Upgrade field.
            (
                &[("connection", "upgrade"), ("x-a", "1")],
                false,
                &[("x-a", "1")],
            ),
        ];
        for (fields, upgrading, sent) in cases {
            let mut h = map(fields);
            assert_eq!(strip_request(&mut h), *upgrading, "{fields:?}");
            assert_eq!(pairs(&h), want(sent), "{fields:?}");
        }
    }

    #[test]
    fn a_switch_keeps_its_connection_and_upgrade_fields() {
        let mut h = map(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-accept", "a"),
        ]);
        strip_response(&mut h, true);
        assert_eq!(
            pairs(&h),
            want(&[
                ("upgrade", "websocket"),
                ("connection", "Upgrade, x-hop"),
                ("sec-websocket-accept", "a"),
            ])
        );
        let mut h = map(&[("upgrade", "h2c"), ("connection", "Upgrade"), ("x-a", "1")]);
        strip_response(&mut h, false);
        assert_eq!(pairs(&h), want(&[("x-a", "1")]));
    }

    #[test]
    fn a_switch_must_be_to_an_offered_protocol() {
        let offered = [HeaderValue::from_static("websocket, foo/2")];
        for (upgrade, ok) in [
            ("websocket", true),
            ("WebSocket", true),
            ("foo/3", true),
            ("h2c", false),
            ("websocket, h2c", false),
            ("", false),
        ] {
            let h = map(&[("upgrade", upgrade)]);
            assert_eq!(switches_to_offered(&offered, &h), ok, "{upgrade}");
        }
        assert!(!switches_to_offered(&offered, &HeaderMap::new()));
    }
}
