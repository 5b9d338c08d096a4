//! Host names: normalisation (lower case, trailing dot, IDN to punycode) and
//! the matcher of exact names and `*.suffix` wildcards on label boundaries.
//!
//! `*.telegram.org` matches `web.telegram.org` and `a.b.telegram.org` but not
//! `telegram.org` (list the apex on its own) and never `xtelegram.org`. When
//! several rules hold, the exact name wins, then the longest suffix.
use std::collections::HashMap;

/// Longest DNS name (RFC 1035 §2.3.4), without the trailing dot.
pub const MAX_HOST_LEN: usize = 253;

/// Normalise a host name for matching: ASCII lower case, one trailing dot
/// removed, Unicode labels converted to punycode (UTS #46). `None` for
/// anything that is not a plausible DNS name (empty, too long, spaces,
/// control characters, empty labels).
pub fn normalize_host(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    let ascii = if name.is_ascii() && !has_punycode(name) {
        name.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(name).ok()?
    };
    valid_ascii_host(&ascii).then_some(ascii)
}

fn has_punycode(name: &str) -> bool {
    name.split('.')
        .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"))
}

fn valid_ascii_host(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOST_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Exact names and wildcard suffixes mapped to a rule index.
#[derive(Debug, Clone, Default)]
pub struct HostMatcher {
    exact: HashMap<Box<str>, u32>,
    suffix: HashMap<Box<str>, u32>,
}

/// What matched: the rule index and whether it was the exact name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostHit {
    pub rule: u32,
    pub exact: bool,
}

impl HostMatcher {
    /// Add a normalised pattern (`name` or `*.suffix`). Returns false when
    /// the same pattern was already present (the first rule keeps it).
    pub fn insert(&mut self, pattern: &str, rule: u32) -> bool {
        let (map, key) = match pattern.strip_prefix("*.") {
            Some(suffix) => (&mut self.suffix, suffix),
            None => (&mut self.exact, pattern),
        };
        if map.contains_key(key) {
            return false;
        }
        map.insert(key.into(), rule);
        true
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.suffix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Look a raw name up (normalised here; ASCII names without allocating).
    pub fn lookup(&self, name: &str) -> Option<HostHit> {
        if self.is_empty() {
            return None;
        }
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        if trimmed.is_ascii() && !has_punycode(trimmed) && trimmed.len() <= MAX_HOST_LEN {
            let mut buf = [0u8; MAX_HOST_LEN];
            let bytes = &mut buf[..trimmed.len()];
            bytes.copy_from_slice(trimmed.as_bytes());
            bytes.make_ascii_lowercase();
            // Lower-casing ASCII keeps it valid UTF-8.
            let lower = std::str::from_utf8(bytes).ok()?;
            return self.lookup_normalized(lower);
        }
        let normalized = normalize_host(name)?;
        self.lookup_normalized(&normalized)
    }

    /// Look up a name already in normal form.
    pub fn lookup_normalized(&self, name: &str) -> Option<HostHit> {
        if let Some(&rule) = self.exact.get(name) {
            return Some(HostHit { rule, exact: true });
        }
        // Longest suffix first: walk the label boundaries left to right.
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(&rule) = self.suffix.get(rest) {
                return Some(HostHit { rule, exact: false });
            }
        }
        None
    }
}

/// Does `name` (normalised) fall under `pattern` (`name` or `*.suffix`)?
/// For short lists such as the policy allow-list.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1
                && name.ends_with(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher() -> HostMatcher {
        let mut m = HostMatcher::default();
        for (i, p) in [
            "telegram.org",
            "*.telegram.org",
            "web.whatsapp.com",
            "*.whatsapp.net",
            "*.xn--80ak6aa92e.com",
            "*.deep.example.com",
            "*.example.com",
        ]
        .iter()
        .enumerate()
        {
            assert!(m.insert(p, i as u32));
        }
        m
    }

    #[test]
    fn host_matcher_table() {
        let m = matcher();
        let cases: &[(&str, Option<(u32, bool)>)] = &[
            ("telegram.org", Some((0, true))),
            ("TELEGRAM.ORG.", Some((0, true))),
            ("web.telegram.org", Some((1, false))),
            ("a.b.Telegram.Org", Some((1, false))),
            ("xtelegram.org", None),
            ("telegram.org.evil.com", None),
            ("org", None),
            ("web.whatsapp.com", Some((2, true))),
            ("Web.WhatsApp.Com.", Some((2, true))),
            ("whatsapp.com", None),
            ("x.web.whatsapp.com", None),
            ("mmg.whatsapp.net", Some((3, false))),
            ("whatsapp.net", None),
            ("a.deep.example.com", Some((5, false))),
            ("deep.example.com", Some((6, false))),
            ("www.example.com", Some((6, false))),
            // IDN: the Unicode label and its punycode form are the same name.
            ("шпион.xn--80ak6aa92e.com", Some((4, false))),
            ("www.аррӏе.com", Some((4, false))),
            ("", None),
            (".", None),
        ];
        for (name, want) in cases {
            let got = m.lookup(name).map(|h| (h.rule, h.exact));
            assert_eq!(got, *want, "{name:?}");
        }
    }

    #[test]
    fn duplicate_patterns_keep_the_first_rule() {
        let mut m = HostMatcher::default();
        assert!(m.insert("a.com", 1));
        assert!(!m.insert("a.com", 2));
        assert_eq!(m.lookup("a.com").map(|h| h.rule), Some(1));
    }

    #[test]
    fn normalization() {
        assert_eq!(
            normalize_host("WWW.Example.COM."),
            Some("www.example.com".into())
        );
        assert_eq!(
            normalize_host("bücher.example"),
            Some("xn--bcher-kva.example".into())
        );
        assert_eq!(
            normalize_host("XN--BCHER-KVA.example"),
            Some("xn--bcher-kva.example".into())
        );
        assert_eq!(normalize_host("a..b"), None);
        assert_eq!(normalize_host("a b.com"), None);
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host(&"a".repeat(64)), None);
    }

    #[test]
    fn pattern_matches_on_label_boundaries() {
        assert!(pattern_matches("*.microsoft.com", "login.microsoft.com"));
        assert!(!pattern_matches("*.microsoft.com", "microsoft.com"));
        assert!(!pattern_matches("*.microsoft.com", "xmicrosoft.com"));
        assert!(pattern_matches("login.live.com", "login.live.com"));
        assert!(!pattern_matches("login.live.com", "a.login.live.com"));
    }
}
