//! HTTP request rules: method, exact path or path prefix, header patterns and
//! body patterns on the first bytes of a request body. Pure: the front ends
//! hand a [`HeadView`] over hyper's `Parts` or an httparse request.
use super::payload::{Anchor, Atom};

/// How a header value must look (compared ASCII case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderTest {
    Equals(Vec<u8>),
    Prefix(Vec<u8>),
    Contains(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCond {
    /// Lower case.
    pub name: String,
    pub test: HeaderTest,
}

/// One compiled `[[http]]` rule; every condition present must hold.
#[derive(Debug, Clone)]
pub struct HttpRule {
    pub rule: u32,
    pub method: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub headers: Vec<HeaderCond>,
    pub body: Vec<Atom>,
}

/// A request head as the rules see it.
pub trait HeadView {
    fn method(&self) -> &str;
    /// The path of the target, without the query.
    fn path(&self) -> &str;
    /// Call `f` on every value of header `name` (lower case) until it returns true.
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool;
    /// Call `f` on the name of every header field (in any case).
    fn each_name(&self, f: &mut dyn FnMut(&str));
}

impl HeadView for http::request::Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers.get_all(name).iter().any(|v| f(v.as_bytes()))
    }
    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        self.headers.keys().for_each(|k| f(k.as_str()));
    }
}

/// The path of a request target without the query, as `http::Uri::path`
/// gives it: origin-form as is, absolute-form after the authority.
fn target_path(target: &str) -> &str {
    let scheme_end = target.as_bytes().windows(3).position(|w| w == b"://");
    let path = match scheme_end {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            match rest.find('/') {
                Some(j) => &rest[j..],
                None => "/",
            }
        }
        _ => target,
    };
    path.split(['?', '#']).next().unwrap_or(path)
}

impl HeadView for httparse::Request<'_, '_> {
    fn method(&self) -> &str {
        self.method.unwrap_or("")
    }

    fn path(&self) -> &str {
        target_path(self.path.unwrap_or(""))
    }

    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .any(|h| f(h.value))
    }

    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        self.headers.iter().for_each(|h| f(h.name));
    }
}

/// What the head alone says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadOutcome {
    Match(u32),
    /// The head satisfies these rules' head conditions; their body
    /// conditions decide. `window` bytes of body are enough to decide.
    NeedBody {
        window: usize,
    },
    NoMatch,
}

#[derive(Debug, Clone, Default)]
pub struct HttpMatcher {
    rules: Vec<HttpRule>,
    /// The distinct header names the rules test (lower case); the first
    /// 64 have a bit in `need`.
    names: Vec<String>,
    /// Per rule, the bits of the header names it cannot hold without. A
    /// request lacking one skips the rule without a header lookup.
    need: Vec<u64>,
}

impl HttpMatcher {
    pub fn new(rules: Vec<HttpRule>) -> HttpMatcher {
        let mut names: Vec<String> = Vec::new();
        let need = rules
            .iter()
            .map(|r| {
                let mut bits = 0u64;
                for c in &r.headers {
                    let i = names.iter().position(|n| *n == c.name).unwrap_or_else(|| {
                        names.push(c.name.clone());
                        names.len() - 1
                    });
                    if i < 64 {
                        bits |= 1 << i;
                    }
                }
                bits
            })
            .collect();
        HttpMatcher { rules, names, need }
    }

    /// The bits of the tested header names that `head` has.
    fn present(&self, head: &dyn HeadView) -> u64 {
        let mut bits = 0u64;
        if !self.names.is_empty() {
            let tested = &self.names[..self.names.len().min(64)];
            head.each_name(&mut |name| {
                if let Some(i) = tested.iter().position(|t| t.eq_ignore_ascii_case(name)) {
                    bits |= 1 << i;
                }
            });
        }
        bits
    }

    /// The rules whose header names are all present, in order.
    fn candidates<'a>(&'a self, head: &dyn HeadView) -> impl Iterator<Item = &'a HttpRule> {
        let present = self.present(head);
        self.rules
            .iter()
            .zip(&self.need)
            .filter(move |(_, need)| *need & !present == 0)
            .map(|(r, _)| r)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[HttpRule] {
        &self.rules
    }

    /// Decide on the head; `has_body` says whether a body may follow.
    pub fn classify_head(&self, head: &dyn HeadView, has_body: bool) -> HeadOutcome {
        let mut window = 0usize;
        // The target's path once per head, not once per rule.
        let path = head.path();
        for r in self.candidates(head) {
            if !head_holds(r, head, path) {
                continue;
            }
            if r.body.is_empty() {
                return HeadOutcome::Match(r.rule);
            }
            if has_body {
                window = window.max(r.body.iter().map(atom_reach).max().unwrap_or(0));
            }
        }
        if window > 0 {
            HeadOutcome::NeedBody { window }
        } else {
            HeadOutcome::NoMatch
        }
    }

    /// Decide on the head and the first bytes of the body (as much as the
    /// rules' window, or the whole body when it is shorter).
    pub fn classify_body(&self, head: &dyn HeadView, body: &[u8]) -> Option<u32> {
        let path = head.path();
        self.candidates(head)
            .filter(|r| !r.body.is_empty() && head_holds(r, head, path))
            .find(|r| r.body.iter().all(|a| atom_holds(a, body)))
            .map(|r| r.rule)
    }
}

fn head_holds(r: &HttpRule, head: &dyn HeadView, path: &str) -> bool {
    if let Some(m) = &r.method {
        if !head.method().eq_ignore_ascii_case(m) {
            return false;
        }
    }
    if let Some(p) = &r.path {
        if path != p {
            return false;
        }
    }
    if let Some(p) = &r.path_prefix {
        if !path.starts_with(p.as_str()) {
            return false;
        }
    }
    r.headers.iter().all(|c| {
        head.any_value(&c.name, &mut |v: &[u8]| match &c.test {
            HeaderTest::Equals(want) => v.trim_ascii().eq_ignore_ascii_case(want),
            HeaderTest::Prefix(want) => {
                v.len() >= want.len() && v[..want.len()].eq_ignore_ascii_case(want)
            }
            HeaderTest::Contains(want) => find(v, want, true).is_some(),
        })
    })
}

/// How many leading bytes an atom can need.
pub fn atom_reach(a: &Atom) -> usize {
    match a.anchor {
        Anchor::At(o) => o.saturating_add(a.bytes.len()),
        Anchor::Within(n) => n,
    }
}

/// Does the atom hold in `buf` (the first bytes of a stream)?
pub fn atom_holds(a: &Atom, buf: &[u8]) -> bool {
    match a.anchor {
        Anchor::At(o) => buf
            .get(o..o.saturating_add(a.bytes.len()))
            .is_some_and(|w| eq(w, &a.bytes, a.nocase)),
        Anchor::Within(n) => find(&buf[..buf.len().min(n)], &a.bytes, a.nocase).is_some(),
    }
}

fn eq(a: &[u8], b: &[u8], nocase: bool) -> bool {
    if nocase {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// First position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8], nocase: bool) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len())
        .position(|w| eq(w, needle, nocase))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_paths() {
        assert_eq!(target_path("/a/b?c=d"), "/a/b");
        assert_eq!(target_path("http://h.example/x/y?z"), "/x/y");
        assert_eq!(target_path("http://h.example"), "/");
        assert_eq!(target_path("/http://not-absolute"), "/http://not-absolute");
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn matcher() -> HttpMatcher {
        HttpMatcher::new(vec![
            HttpRule {
                rule: 1,
                method: None,
                path: None,
                path_prefix: Some("/gateway/gateway.dll".into()),
                headers: vec![],
                body: vec![],
            },
            HttpRule {
                rule: 2,
                method: None,
                path: None,
                path_prefix: None,
                headers: vec![HeaderCond {
                    name: "sec-websocket-protocol".into(),
                    test: HeaderTest::Equals(b"xmpp".to_vec()),
                }],
                body: vec![],
            },
            HttpRule {
                rule: 3,
                method: Some("POST".into()),
                path: Some("/api".into()),
                path_prefix: None,
                headers: vec![],
                body: vec![Atom {
                    bytes: vec![0; 8],
                    anchor: Anchor::At(0),
                    nocase: false,
                }],
            },
            HttpRule {
                rule: 4,
                method: None,
                path: None,
                path_prefix: None,
                headers: vec![HeaderCond {
                    name: "user-agent".into(),
                    test: HeaderTest::Prefix(b"msmsgs".to_vec()),
                }],
                body: vec![],
            },
        ])
    }

    type HeadCase<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        bool,
        HeadOutcome,
    );

    /// Rules on more header names than the presence mask has bits, and a
    /// rule on two names: the mask only skips, never decides a match.
    #[test]
    fn header_presence_mask() {
        let rule = |rule: u32, names: &[String]| HttpRule {
            rule,
            method: None,
            path: None,
            path_prefix: None,
            headers: names
                .iter()
                .map(|n| HeaderCond {
                    name: n.clone(),
                    test: HeaderTest::Prefix(b"yes".to_vec()),
                })
                .collect(),
            body: vec![],
        };
        let name = |i: u32| format!("x-name-{i}");
        let mut rules: Vec<HttpRule> = (0..70).map(|i| rule(i, &[name(i)])).collect();
        rules.push(rule(100, &[name(3), name(68)]));
        let m = HttpMatcher::new(rules);
        for i in [0, 63, 64, 69] {
            let head = parts("GET", "http://x/", &[(&name(i), "yes please")]);
            assert_eq!(m.classify_head(&head, false), HeadOutcome::Match(i), "{i}");
            let head = parts("GET", "http://x/", &[(&name(i), "no")]);
            assert_eq!(m.classify_head(&head, false), HeadOutcome::NoMatch, "{i}");
        }
        // Both names needed; rules 3 and 68 alone fail on their values.
        let head = parts("GET", "http://x/", &[(&name(3), "no"), (&name(68), "no")]);
        assert_eq!(m.classify_head(&head, false), HeadOutcome::NoMatch);
        let head = parts("GET", "http://x/", &[(&name(68), "yes")]);
        assert_eq!(m.classify_head(&head, false), HeadOutcome::Match(68));
        let m = HttpMatcher::new(vec![rule(100, &[name(3), name(68)])]);
        let both = parts("GET", "http://x/", &[(&name(3), "yes"), (&name(68), "yes")]);
        assert_eq!(m.classify_head(&both, false), HeadOutcome::Match(100));
        let one = parts("GET", "http://x/", &[(&name(3), "yes")]);
        assert_eq!(m.classify_head(&one, false), HeadOutcome::NoMatch);
    }

    #[test]
    fn head_rules() {
        let m = matcher();
        let cases: &[HeadCase] = &[
            (
                "POST",
                "http://x/gateway/gateway.dll?Action=open",
                &[],
                true,
                HeadOutcome::Match(1),
            ),
            ("GET", "http://x/gateway/", &[], false, HeadOutcome::NoMatch),
            (
                "GET",
                "http://x/ws",
                &[("Sec-WebSocket-Protocol", "XMPP")],
                false,
                HeadOutcome::Match(2),
            ),
            (
                "GET",
                "http://x/ws",
                &[("Sec-WebSocket-Protocol", "xmpp2")],
                false,
                HeadOutcome::NoMatch,
            ),
            (
                "POST",
                "http://1.2.3.4/api",
                &[],
                true,
                HeadOutcome::NeedBody { window: 8 },
            ),
            (
                "POST",
                "http://1.2.3.4/api/v4/users",
                &[],
                true,
                HeadOutcome::NoMatch,
            ),
            (
                "GET",
                "http://1.2.3.4/api",
                &[],
                false,
                HeadOutcome::NoMatch,
            ),
            (
                "GET",
                "http://x/",
                &[("User-Agent", "MSMSGS")],
                false,
                HeadOutcome::Match(4),
            ),
            (
                "GET",
                "http://x/",
                &[("User-Agent", "Mozilla/5.0 MSMSGS")],
                false,
                HeadOutcome::NoMatch,
            ),
        ];
        for (method, uri, headers, has_body, want) in cases {
            let p = parts(method, uri, headers);
            assert_eq!(&m.classify_head(&p, *has_body), want, "{method} {uri}");
        }
    }

    #[test]
    fn body_rules() {
        let m = matcher();
        let p = parts("POST", "http://149.154.167.51/api", &[]);
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&[0xf1, 0x8e, 0x7e, 0xbe]);
        assert_eq!(m.classify_body(&p, &body), Some(3));
        assert_eq!(m.classify_body(&p, b"{\"json\":1}"), None);
    }

    #[test]
    fn find_nocase() {
        assert_eq!(find(b"xxJabber:Client", b"jabber:client", true), Some(2));
        assert_eq!(find(b"xxJabber:Client", b"jabber:client", false), None);
        assert_eq!(find(b"ab", b"abc", false), None);
    }
}
