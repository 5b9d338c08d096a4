//! Leaf certificates for decrypted flows, minted under the [`Authority`]
//! and kept in a bounded cache.
//!
//! A leaf (TLS-INSPECT 6.3): a fresh ECDSA P-256 key each (ring makes one in
//! ~25 µs; the CA key never signs a handshake), a random 128-bit serial, CN
//! = the SNI when it fits (≤ 64 characters, RFC 5280 ub-common-name; else an
//! empty subject and a critical subjectAltName, RFC 5280 4.2.1.6), SANs =
//! the upstream's names ∪ the SNI (IP literals as IP SANs, at most
//! [`MAX_SANS`]), key usage digitalSignature (critical), EKU serverAuth,
//! basicConstraints CA:FALSE, the CA's key identifier as authority key
//! identifier and no subject key identifier (SChannel chain building),
//! valid from a day ago (client clock skew) for 30 days, never past the
//! CA's notAfter.
//!
//! The cache is keyed by (SNI, SHA-256 of the upstream leaf): a changed
//! upstream certificate gets a new leaf with its names. Entries expire after
//! the configured TTL or with the leaf, whichever comes first. Concurrent
//! misses for one key mint once: the first caller holds quick_cache's
//! placeholder guard, the others wait for its value.
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, DefaultLifecycle, GuardResult};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, UnitWeighter};
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::ca::{now_unix, random_serial, unix_to_rfc3339};
use super::Authority;

/// At most this many names in one leaf (the SNI included).
pub const MAX_SANS: usize = 100;
/// The longest CN (RFC 5280 appendix A, ub-common-name).
const MAX_CN: usize = 64;
const DAY: i64 = 86_400;
/// How far back a leaf's notBefore lies: clients with a slow clock.
const BACKDATE: i64 = DAY;
/// A leaf's longest life.
const LEAF_DAYS: i64 = 30;
/// How often one call goes back to the cache after finding an expired
/// entry (another caller may be replacing it) before it mints uncached.
const MAX_CACHE_ROUNDS: usize = 4;

/// A name in a leaf's subjectAltName.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// Lower case, no trailing dot; a leading `*.` label is kept.
    Dns(String),
    Ip(IpAddr),
}

impl LeafName {
    /// A name as the SNI, a CONNECT authority or the upstream certificate
    /// gives it: white space and a trailing dot dropped, lower-cased, an IP
    /// literal (IPv6 with or without brackets) as an address. None if it is
    /// neither an address nor a DNS name (letters, digits, `-`, `_`; labels
    /// of 1 to 63 characters; at most 253 in all; `*` only as the whole
    /// first label).
    pub fn parse(raw: &str) -> Option<LeafName> {
        let s = raw.trim();
        let s = s.strip_suffix('.').unwrap_or(s);
        let bare = s
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Some(LeafName::Ip(ip));
        }
        let lower = s.to_ascii_lowercase();
        if lower.is_empty() || lower.len() > 253 {
            return None;
        }
        let valid = lower.split('.').enumerate().all(|(i, label)| {
            (i == 0 && label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        });
        // A bare "*" is no name.
        (valid && lower != "*").then_some(LeafName::Dns(lower))
    }

    fn text(&self) -> String {
        match self {
            LeafName::Dns(s) => s.clone(),
            LeafName::Ip(ip) => ip.to_string(),
        }
    }
}

/// The SNI first, then the other names that parse, without repeats, at
/// most [`MAX_SANS`]. An SNI that is no name is an error; other names that
/// are not are left out.
pub fn leaf_names(sni: &str, names: &[String]) -> Result<Vec<LeafName>, String> {
    let first = LeafName::parse(sni).ok_or_else(|| format!("not a host name: {sni:?}"))?;
    let mut out = vec![first];
    for n in names {
        if out.len() >= MAX_SANS {
            break;
        }
        if let Some(name) = LeafName::parse(n) {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// What signs a leaf: the CA as issuer, its key, whether to add an
/// authority key identifier, and the CA's notAfter.
pub(crate) struct Signer<'a> {
    pub issuer: &'a rcgen::Certificate,
    pub key: &'a KeyPair,
    pub with_aki: bool,
    pub not_after: i64,
}

/// A signed leaf and its key.
pub(crate) struct SignedLeaf {
    der: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    not_after: i64,
}

impl SignedLeaf {
    pub(crate) fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }
}

/// A DER length.
fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// A DER tag-length-value.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    out.push(tag);
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// subjectAltName's GeneralNames (RFC 5280 4.2.1.6): dNSName [2] and
/// iPAddress [7], both IMPLICIT.
fn general_names(names: &[LeafName]) -> Vec<u8> {
    let mut seq = Vec::new();
    for n in names {
        match n {
            LeafName::Dns(s) => seq.extend(der_tlv(0x82, s.as_bytes())),
            LeafName::Ip(IpAddr::V4(a)) => seq.extend(der_tlv(0x87, &a.octets())),
            LeafName::Ip(IpAddr::V6(a)) => seq.extend(der_tlv(0x87, &a.octets())),
        }
    }
    der_tlv(0x30, &seq)
}

/// Sign a leaf for `names` with CN `cn` (when it fits), valid from `now` −
/// a day to min(`now` + 30 days, the CA's notAfter).
pub(crate) fn sign_leaf(
    signer: Signer<'_>,
    cn: &str,
    names: &[LeafName],
    now: i64,
) -> Result<SignedLeaf, String> {
    if now >= signer.not_after {
        return Err(format!(
            "the CA expired at {}",
            unix_to_rfc3339(signer.not_after)
        ));
    }
    let not_after = (now + LEAF_DAYS * DAY).min(signer.not_after);
    let at = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map_err(|e| format!("a date out of range: {e}"))
    };
    let mut params = CertificateParams::default();
    params.not_before = at(now - BACKDATE)?;
    params.not_after = at(not_after)?;
    params.serial_number = Some(random_serial()?);
    let mut dn = DistinguishedName::new();
    if !cn.is_empty() && cn.len() <= MAX_CN {
        dn.push(DnType::CommonName, cn);
    }
    let empty_subject = dn.iter().next().is_none();
    params.distinguished_name = dn;
    if !names.is_empty() {
        if empty_subject {
            // RFC 5280 4.2.1.6: with an empty subject the subjectAltName
            // is critical; rcgen writes it non-critical, so it is written here.
            let mut san = CustomExtension::from_oid_content(&[2, 5, 29, 17], general_names(names));
            san.set_criticality(true);
            params.custom_extensions.push(san);
        } else {
            params.subject_alt_names = names
                .iter()
                .map(|n| match n {
                    LeafName::Dns(s) => s
                        .as_str()
                        .try_into()
                        .map(SanType::DnsName)
                        .map_err(|e| format!("{s}: {e}")),
                    LeafName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
                })
                .collect::<Result<_, _>>()?;
        }
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // rcgen's ExplicitNoCa would add a subject key identifier as well.
    params.is_ca = IsCa::NoCa;
    let mut basic = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
    basic.set_criticality(true);
    params.custom_extensions.push(basic);
    params.use_authority_key_identifier_extension = signer.with_aki;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make a leaf key: {e}"))?;
    let cert = params
        .signed_by(&key, signer.issuer, signer.key)
        .map_err(|e| format!("cannot sign a leaf: {e}"))?;
    Ok(SignedLeaf {
        der: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        not_after,
    })
}

/// Whether [`Minter::leaf`] found the leaf in the cache (or waited for a
/// concurrent caller's mint) or minted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
}

impl CacheResult {
    /// The `result` label of a cache metric.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    sni: String,
    upstream: [u8; 32],
}

#[derive(Clone)]
struct Entry {
    key: Arc<CertifiedKey>,
    expires: Instant,
}

type LeafCache =
    Cache<CacheKey, Entry, UnitWeighter, DefaultHashBuilder, DefaultLifecycle<CacheKey, Entry>>;

/// The metrics a [`Minter`] keeps up to date, if given.
#[derive(Clone)]
pub struct MintMetrics {
    pub minted: prometheus::IntCounter,
    pub mint_seconds: prometheus::Histogram,
    pub cache_entries: prometheus::IntGauge,
}

/// Mints leaves under one [`Authority`] and keeps them in a bounded cache.
pub struct Minter {
    authority: Arc<Authority>,
    /// None when `max_entries` is 0: every call mints.
    cache: Option<LeafCache>,
    ttl: Duration,
    minted: AtomicU64,
    metrics: Option<MintMetrics>,
}

/// The cache for `max_entries`: quick_cache rounds each shard's capacity
/// up, so the shard count divides a capacity of at most `max_entries`
/// (shards of at least 32 entries, at most 16 shards).
fn leaf_cache(max_entries: usize) -> Option<LeafCache> {
    if max_entries == 0 {
        return None;
    }
    let mut shards = 1usize;
    while shards < 16 && max_entries / (shards * 2) >= 32 {
        shards *= 2;
    }
    let capacity = (max_entries / shards) * shards;
    debug_assert!(capacity >= 1 && capacity <= max_entries);
    let options = OptionsBuilder::new()
        .shards(shards)
        .estimated_items_capacity(capacity)
        .weight_capacity(capacity as u64)
        .build()
        .ok()?;
    Some(Cache::with_options(
        options,
        UnitWeighter,
        DefaultHashBuilder::default(),
        DefaultLifecycle::default(),
    ))
}

impl Minter {
    /// A minter under `authority` keeping at most `max_entries` leaves
    /// (0: none, every call mints), each for at most `ttl`.
    pub fn new(authority: Arc<Authority>, max_entries: usize, ttl: Duration) -> Minter {
        Minter {
            authority,
            cache: leaf_cache(max_entries),
            ttl,
            minted: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// Count mints, time them and report the cache size in these metrics.
    pub fn with_metrics(mut self, metrics: MintMetrics) -> Minter {
        self.metrics = Some(metrics);
        self
    }

    /// The authority leaves are minted under.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// A leaf for `sni` whose SANs are `names` ∪ {`sni`} (see
    /// [`leaf_names`]), cached by (`sni`, `upstream_leaf_sha256`): reused
    /// while unexpired and the upstream leaf is the same, else minted.
    /// Concurrent callers missing the same key mint once; the others wait
    /// for that result (and see [`CacheResult::Hit`]).
    ///
    /// Blocking: a miss mints (about 100 µs of CPU) and a concurrent miss
    /// waits for another thread's mint, so async callers call it inside
    /// `tokio::task::spawn_blocking`. Callers without an upstream (a block
    /// page) pass an all-zero fingerprint.
    pub fn leaf(
        &self,
        sni: &str,
        names: &[String],
        upstream_leaf_sha256: [u8; 32],
    ) -> Result<(Arc<CertifiedKey>, CacheResult), String> {
        let sans = leaf_names(sni, names)?;
        let Some(cache) = &self.cache else {
            return self.mint(&sans).map(|e| (e.key, CacheResult::Miss));
        };
        let key = CacheKey {
            sni: sans[0].text(),
            upstream: upstream_leaf_sha256,
        };
        for _ in 0..MAX_CACHE_ROUNDS {
            match cache.get_value_or_guard(&key, None) {
                GuardResult::Value(e) if e.expires > Instant::now() => {
                    return Ok((e.key, CacheResult::Hit))
                }
                GuardResult::Value(stale) => {
                    // Only that entry: a fresh one another caller put in
                    // meanwhile stays.
                    cache.remove_if(&key, |cur| Arc::ptr_eq(&cur.key, &stale.key));
                }
                GuardResult::Guard(guard) => {
                    let entry = self.mint(&sans)?;
                    let _ = guard.insert(entry.clone());
                    self.report_len();
                    return Ok((entry.key, CacheResult::Miss));
                }
                GuardResult::Timeout => {}
            }
        }
        self.mint(&sans).map(|e| (e.key, CacheResult::Miss))
    }

    fn mint(&self, sans: &[LeafName]) -> Result<Entry, String> {
        let started = Instant::now();
        let cn = sans.first().map(LeafName::text).unwrap_or_default();
        let now = now_unix();
        let leaf = self.authority.sign_leaf(&cn, sans, now)?;
        let signing =
            rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(leaf.key))
                .map_err(|e| format!("cannot use a leaf key: {e}"))?;
        let mut chain = Vec::with_capacity(1 + self.authority.chain_after_leaf().len());
        chain.push(leaf.der);
        chain.extend(self.authority.chain_after_leaf().iter().cloned());
        let lifetime = Duration::from_secs(u64::try_from(leaf.not_after - now).unwrap_or(0));
        let entry = Entry {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            expires: Instant::now() + self.ttl.min(lifetime),
        };
        self.minted.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.minted.inc();
            m.mint_seconds.observe(started.elapsed().as_secs_f64());
        }
        Ok(entry)
    }

    fn report_len(&self) {
        if let Some(m) = &self.metrics {
            m.cache_entries
                .set(i64::try_from(self.len()).unwrap_or(i64::MAX));
        }
    }

    /// Leaves in the cache now (never above `max_entries`).
    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// Whether the cache holds no leaf.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Leaves minted since start.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// Drop every cached leaf (a reload with another CA builds a new
    /// minter instead).
    pub fn clear(&self) {
        if let Some(c) = &self.cache {
            c.clear();
        }
        self.report_len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_a_leaf_carries_them() {
        let dns = |s: &str| Some(LeafName::Dns(s.to_string()));
        let ip = |s: &str| Some(LeafName::Ip(s.parse().unwrap()));
        for (raw, want) in [
            ("chat.example.test", dns("chat.example.test")),
            ("Chat.Example.TEST.", dns("chat.example.test")),
            (" a.b ", dns("a.b")),
            ("*.b.example.test", dns("*.b.example.test")),
            ("_srv.example.test", dns("_srv.example.test")),
            ("localhost", dns("localhost")),
            ("192.0.2.1", ip("192.0.2.1")),
            ("[2001:db8::1]", ip("2001:db8::1")),
            ("2001:db8::1", ip("2001:db8::1")),
            ("", None),
            (".", None),
            ("*", None),
            ("a.*.example.test", None),
            ("*x.example.test", None),
            ("a..b", None),
            ("a b.example.test", None),
            ("bücher.example", None),
            ("a/b", None),
        ] {
            assert_eq!(LeafName::parse(raw), want, "{raw:?}");
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert_eq!(LeafName::parse(&long_label), None);
        let long_name = ["abcdefghi"; 26].join(".");
        assert!(long_name.len() > 253);
        assert_eq!(LeafName::parse(&long_name), None);
    }

    #[test]
    fn leaf_names_put_the_sni_first_without_repeats_and_cap_the_count() {
        let names: Vec<String> = ["B.test", "sni.test", "b.test.", "bad name", "10.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let got = leaf_names("SNI.test", &names).unwrap();
        assert_eq!(
            got,
            [
                LeafName::Dns("sni.test".into()),
                LeafName::Dns("b.test".into()),
                LeafName::Ip("10.0.0.1".parse().unwrap()),
            ]
        );
        let many: Vec<String> = (0..500).map(|i| format!("n{i}.test")).collect();
        let got = leaf_names("sni.test", &many).unwrap();
        assert_eq!(got.len(), MAX_SANS);
        assert_eq!(got[0], LeafName::Dns("sni.test".into()));
        assert!(leaf_names("not a name", &[]).is_err());
    }

    #[test]
    fn der_lengths_short_and_long() {
        for (n, want) in [
            (0usize, vec![0x00]),
            (0x7f, vec![0x7f]),
            (0x80, vec![0x81, 0x80]),
            (0xff, vec![0x81, 0xff]),
            (0x100, vec![0x82, 0x01, 0x00]),
            (0x1_0000, vec![0x83, 0x01, 0x00, 0x00]),
        ] {
            let mut out = Vec::new();
            der_len(n, &mut out);
            assert_eq!(out, want, "{n:#x}");
        }
        assert_eq!(
            general_names(&[
                LeafName::Dns("a.b".into()),
                LeafName::Ip("192.0.2.1".parse().unwrap())
            ]),
            [0x30, 0x0b, 0x82, 0x03, b'a', b'.', b'b', 0x87, 0x04, 192, 0, 2, 1]
        );
    }

    #[test]
    fn cache_capacity_never_exceeds_max_entries() {
        assert!(leaf_cache(0).is_none());
        for max in [1, 2, 31, 63, 64, 100, 1000, 1023, 10_000, 12_345] {
            let cache = leaf_cache(max).unwrap();
            let cap = cache.capacity();
            assert!(
                cap <= max as u64 && cap * 100 >= max as u64 * 95,
                "{max}: {cap}"
            );
        }
    }

    #[test]
    fn a_minter_keeps_its_metrics() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let new = crate::tls_inspect::ca::generate("metrics CA", 10).unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        std::fs::write(&cert, &new.cert_pem).unwrap();
        std::fs::write(&key, &new.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ca = Arc::new(Authority::load(&cert, &key).unwrap());
        let metrics = crate::metrics::Metrics::new();
        metrics.tls_ca_not_after.set(ca.not_after_unix());
        let m = Minter::new(ca, 10, Duration::from_secs(60)).with_metrics(metrics.tls_mint.clone());
        for sni in ["a.test", "b.test", "a.test"] {
            m.leaf(sni, &[], [0; 32]).unwrap();
        }
        let text = metrics.render();
        for want in [
            "chatwall_tls_certs_minted_total 2\n".to_string(),
            "chatwall_tls_cert_cache_entries 2\n".to_string(),
            "chatwall_tls_cert_mint_seconds_count 2\n".to_string(),
            format!(
                "chatwall_tls_ca_not_after_timestamp_seconds {}\n",
                new.not_after
            ),
        ] {
            assert!(text.contains(&want), "{want:?} in {text}");
        }
    }
}
