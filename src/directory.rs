//! Directory groups and directory passwords (`[ldap]`): a user's group
//! memberships, read from an LDAP directory, cached and shared by every
//! flow of that user; and Basic credentials checked by a simple bind.
//!
//! A look-up is made once per user per `cache_ttl`, when a flow of that user
//! needs it (some exception names groups), before the flow is decided: the
//! policy itself stays pure and synchronous ([`crate::policy::Who`] carries
//! the groups). Concurrent flows of one user wait for one query; other
//! users never wait for it. Every exchange (connect, StartTLS, bind,
//! searches) is bounded by `timeout` as a whole and every search by a size
//! limit. A directory that does not answer applies `on_unavailable`, and
//! its answer is not asked for again before [`RETRY_AFTER_FAILURE`].
//!
//! The cache lives in the engine snapshot: a reload starts an empty one.
//! Counting is the caller's: each answer says how it was found
//! ([`Source`]), so this module knows nothing of metrics.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions};
use sha2::{Digest, Sha256};

use crate::config::{group_key, normalize_dn, Ldap, Membership, OnUnavailable};

/// At most this many groups are read for one user (the group search's
/// size limit); more are cut off and logged.
pub const MAX_GROUPS: i32 = 1000;

/// After a failed look-up the fallback answer is kept this long (or
/// `cache_ttl` if shorter), so a directory that is down costs one timeout
/// per user per interval, not one per request.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// At most this many look-ups and binds talk to the directory at once; the
/// others wait their turn within their own timeout (a burst of new users
/// does not open a connection each at the same moment).
pub const MAX_CONCURRENT_QUERIES: usize = 32;

/// A user's groups: [`group_key`]s of their names and DNs.
pub type Groups = Arc<[String]>;

/// How an answer was found, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the cache.
    Hit,
    /// Read from the directory now.
    Miss,
    /// The directory did not answer: the fallback applied.
    Unavailable,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
            Source::Unavailable => "unavailable",
        }
    }
}

/// What a simple bind as a user says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindOutcome {
    User(Arc<str>),
    Wrong,
    Unavailable,
}

struct Entry {
    groups: Groups,
    expires: Instant,
    /// The groups the directory last gave, for `on_unavailable = "stale"`.
    last_good: Option<Groups>,
}

type InFlight = Arc<tokio::sync::OnceCell<(Groups, Source)>>;

/// SHA-256 of a `Proxy-Authorization` value → the user and until when.
type Binds = HashMap<[u8; 32], (Arc<str>, Instant)>;

pub struct Directory {
    cfg: Ldap,
    tls: Arc<rustls::ClientConfig>,
    cache: Mutex<HashMap<Arc<str>, Entry>>,
    inflight: Mutex<HashMap<Arc<str>, InFlight>>,
    /// SHA-256 of a `Proxy-Authorization` value a bind accepted → user,
    /// until `cache_ttl` has passed.
    binds: Mutex<Binds>,
    /// [`MAX_CONCURRENT_QUERIES`].
    slots: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Directory {
    pub fn new(cfg: &Ldap) -> Result<Directory, String> {
        // Our own TLS settings, always: ring as everywhere else in chatwall
        // (ldap3's default takes the process-wide provider), and the
        // system's store read even when some of its certificates do not
        // parse (ldap3's default then trusts nothing).
        let mut roots = rustls::RootCertStore::empty();
        if cfg.ca_certs.is_empty() {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "system CA store");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "directory TLS trusts the system's CA store");
        } else {
            for der in &cfg.ca_certs {
                roots
                    .add(rustls::pki_types::CertificateDer::from(der.clone()))
                    .map_err(|e| format!("ldap.ca_file: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("ldap: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = Arc::new(tls);
        Ok(Directory {
            cfg: cfg.clone(),
            tls,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            binds: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_QUERIES),
        })
    }

    pub fn config(&self) -> &Ldap {
        &self.cfg
    }

    /// The groups of `user`: cached, or read now (one query for all the
    /// flows of the user that ask at once).
    pub async fn groups(&self, user: &Arc<str>) -> (Groups, Source) {
        if let Some(g) = self.cached(user) {
            return (g, Source::Hit);
        }
        let cell = {
            let mut inflight = lock(&self.inflight);
            Arc::clone(inflight.entry(Arc::clone(user)).or_default())
        };
        // Whatever ends this wait (an answer, or the flow going away), the
        // query's entry does not outlive it.
        let _done = Forget {
            inflight: &self.inflight,
            user,
            cell: &cell,
        };
        let mut fresh = false;
        let answer = cell
            .get_or_init(|| {
                fresh = true;
                self.refresh(user)
            })
            .await
            .clone();
        if fresh {
            (answer.0, answer.1)
        } else {
            // Another flow's query answered this one.
            (answer.0, Source::Hit)
        }
    }

    fn cached(&self, user: &str) -> Option<Groups> {
        let cache = lock(&self.cache);
        let e = cache.get(user)?;
        (Instant::now() < e.expires).then(|| Arc::clone(&e.groups))
    }

    /// Ask the directory and store the answer (or the fallback).
    async fn refresh(&self, user: &Arc<str>) -> (Groups, Source) {
        let result = tokio::time::timeout(self.cfg.timeout, self.query(user)).await;
        let now = Instant::now();
        let mut cache = lock(&self.cache);
        let last_good = cache.get(&**user).and_then(|e| e.last_good.clone());
        let (entry, source) = match result {
            Ok(Ok(groups)) => {
                let groups: Groups = groups.into();
                (
                    Entry {
                        groups: Arc::clone(&groups),
                        expires: now + self.cfg.cache_ttl,
                        last_good: Some(groups),
                    },
                    Source::Miss,
                )
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {:?}", self.cfg.timeout),
                };
                tracing::warn!(user = %user, error = %why, fallback = self.cfg.on_unavailable.as_str(),
                    "directory unavailable: groups not read");
                let groups = match (self.cfg.on_unavailable, &last_good) {
                    (OnUnavailable::Stale, Some(g)) => Arc::clone(g),
                    _ => Groups::from(Vec::new()),
                };
                (
                    Entry {
                        groups,
                        expires: now + RETRY_AFTER_FAILURE.min(self.cfg.cache_ttl),
                        last_good,
                    },
                    Source::Unavailable,
                )
            }
        };
        let groups = Arc::clone(&entry.groups);
        if cache.len() >= self.cfg.cache_entries && !cache.contains_key(&**user) {
            make_room(&mut cache, now);
        }
        cache.insert(Arc::clone(user), entry);
        (groups, source)
    }

    /// A connection (TLS as configured), not yet bound.
    async fn open(&self) -> Result<ldap3::Ldap, String> {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(self.cfg.timeout)
            .set_starttls(self.cfg.starttls)
            .set_config(Arc::clone(&self.tls));
        let (conn, ldap) = LdapConnAsync::with_settings(settings, &self.cfg.url)
            .await
            .map_err(|e| format!("connect to {}: {e}", self.cfg.url))?;
        // The connection's driver ends when the handle is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "directory connection ended");
            }
        });
        Ok(ldap)
    }

    /// Connect and bind as the service account (anonymously without
    /// `bind_dn`).
    async fn connect(&self) -> Result<ldap3::Ldap, String> {
        let mut ldap = self.open().await?;
        let password = self
            .cfg
            .bind_password
            .as_ref()
            .map(|s| s.expose())
            .unwrap_or("");
        ldap.simple_bind(&self.cfg.bind_dn, password)
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("bind as `{}`: {e}", self.cfg.bind_dn))?;
        Ok(ldap)
    }

    /// The user's entry: its DN and the values of `attrs`. `Ok(None)`: no
    /// such user (or more than one: ambiguous, refused).
    async fn find_user(
        &self,
        ldap: &mut ldap3::Ldap,
        user: &str,
        attrs: Vec<&str>,
    ) -> Result<Option<SearchEntry>, String> {
        let filter = self
            .cfg
            .user_filter
            .replace("{user}", &ldap3::ldap_escape(user));
        let result = ldap
            .with_search_options(SearchOptions::new().sizelimit(2))
            .search(&self.cfg.base_dn, Scope::Subtree, &filter, attrs)
            .await
            .map_err(|e| format!("user search: {e}"))?;
        // 4: sizeLimitExceeded (RFC 4511 §4.1.9): two entries or more.
        if result.1.rc != 0 && result.1.rc != 4 {
            return Err(format!("user search: {}", result.1));
        }
        let mut entries: Vec<SearchEntry> = result
            .0
            .into_iter()
            .filter(|e| !e.is_ref() && !e.is_intermediate())
            .map(SearchEntry::construct)
            .collect();
        if entries.len() > 1 {
            tracing::warn!(
                user,
                "user_filter finds more than one entry: no groups, no bind"
            );
            return Ok(None);
        }
        Ok(entries.pop())
    }

    /// The groups of `user` as the directory has them now.
    async fn query(&self, user: &str) -> Result<Vec<String>, String> {
        let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
        let mut ldap = self.connect().await?;
        let name_attr = self.cfg.group_name_attribute.as_str();
        let mut groups = Vec::new();
        match &self.cfg.membership {
            Membership::Attribute(attr) => {
                let Some(entry) = self.find_user(&mut ldap, user, vec![attr.as_str()]).await?
                else {
                    let _ = ldap.unbind().await;
                    return Ok(groups);
                };
                for dn in entry
                    .attrs
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
                    .flat_map(|(_, v)| v)
                {
                    groups.push(normalize_dn(dn));
                    if let Some(name) = first_rdn_value(dn, name_attr) {
                        groups.push(name.to_lowercase());
                    }
                }
            }
            Membership::Search { filter, base } => {
                // "1.1": no attributes (RFC 4511 §4.5.1.8), only the DN.
                let Some(entry) = self.find_user(&mut ldap, user, vec!["1.1"]).await? else {
                    let _ = ldap.unbind().await;
                    return Ok(groups);
                };
                let filter = filter
                    .replace("{dn}", &ldap3::ldap_escape(entry.dn.as_str()))
                    .replace("{user}", &ldap3::ldap_escape(user));
                let result = ldap
                    .with_search_options(SearchOptions::new().sizelimit(MAX_GROUPS))
                    .search(base, Scope::Subtree, &filter, vec![name_attr])
                    .await
                    .map_err(|e| format!("group search: {e}"))?;
                if result.1.rc == 4 {
                    tracing::warn!(user, limit = MAX_GROUPS, "more groups than read");
                } else if result.1.rc != 0 {
                    return Err(format!("group search: {}", result.1));
                }
                for e in result.0 {
                    if e.is_ref() || e.is_intermediate() {
                        continue;
                    }
                    let e = SearchEntry::construct(e);
                    groups.push(normalize_dn(&e.dn));
                    for (k, values) in &e.attrs {
                        if k.eq_ignore_ascii_case(name_attr) {
                            groups.extend(values.iter().filter_map(|v| group_key(v)));
                        }
                    }
                }
            }
        }
        let _ = ldap.unbind().await;
        groups.sort();
        groups.dedup();
        Ok(groups)
    }

    /// Check Basic credentials by a simple bind as the user's entry. A
    /// success is remembered (by the header's SHA-256) for `cache_ttl`.
    pub async fn bind(&self, header: &[u8], user: &str, password: &str) -> BindOutcome {
        let key: [u8; 32] = Sha256::digest(header).into();
        let now = Instant::now();
        if let Some((u, until)) = lock(&self.binds).get(&key) {
            if now < *until {
                return BindOutcome::User(Arc::clone(u));
            }
        }
        // An empty password is an unauthenticated bind (RFC 4513 §5.1.2),
        // which servers accept without checking anything.
        if password.is_empty() || user.is_empty() {
            return BindOutcome::Wrong;
        }
        let checked = tokio::time::timeout(self.cfg.timeout, async {
            let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
            let mut ldap = self.connect().await?;
            let entry = self.find_user(&mut ldap, user, vec!["1.1"]).await?;
            let _ = ldap.unbind().await;
            let Some(entry) = entry else {
                return Ok(false);
            };
            let mut ldap = self.open().await?;
            let ok = match ldap.simple_bind(&entry.dn, password).await {
                Ok(r) if r.rc == 0 => true,
                // 49: invalidCredentials (RFC 4511 §4.1.9).
                Ok(r) if r.rc == 49 => false,
                Ok(r) => return Err(format!("bind as the user: {r}")),
                Err(e) => return Err(format!("bind as the user: {e}")),
            };
            let _ = ldap.unbind().await;
            Ok::<bool, String>(ok)
        })
        .await;
        match checked {
            Ok(Ok(true)) => {
                let user: Arc<str> = Arc::from(user);
                let mut binds = lock(&self.binds);
                if binds.len() >= self.cfg.cache_entries {
                    binds.retain(|_, (_, until)| now < *until);
                    if binds.len() >= self.cfg.cache_entries {
                        binds.clear();
                    }
                }
                binds.insert(key, (Arc::clone(&user), now + self.cfg.cache_ttl));
                BindOutcome::User(user)
            }
            Ok(Ok(false)) => BindOutcome::Wrong,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "directory unavailable: credentials not checked");
                BindOutcome::Unavailable
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.cfg.timeout, "directory unavailable: credentials not checked");
                BindOutcome::Unavailable
            }
        }
    }
}

/// Removes a user's query from the in-flight map once it has answered, or
/// once nobody waits for it any more (every flow that asked went away).
struct Forget<'a> {
    inflight: &'a Mutex<HashMap<Arc<str>, InFlight>>,
    user: &'a Arc<str>,
    cell: &'a InFlight,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(self.inflight);
        let ours = inflight
            .get(&**self.user)
            .is_some_and(|c| Arc::ptr_eq(c, self.cell));
        // Two holders: the map and this waiter.
        if ours && (self.cell.initialized() || Arc::strong_count(self.cell) <= 2) {
            inflight.remove(&**self.user);
        }
    }
}

/// Room for one more entry: drop the expired ones, else the one that
/// expires first. A full cache costs one pass over it per insertion.
fn make_room(cache: &mut HashMap<Arc<str>, Entry>, now: Instant) {
    cache.retain(|_, e| now < e.expires);
    if cache.is_empty() {
        return;
    }
    let oldest = cache
        .iter()
        .min_by_key(|(_, e)| e.expires)
        .map(|(k, _)| Arc::clone(k));
    if let Some(k) = oldest {
        cache.remove(&k);
    }
}

/// The value of a DN's first RDN when its attribute is `attr`
/// (`cn=sales,ou=groups,...` → `sales`), with RFC 4514 §2.4 escapes undone.
pub fn first_rdn_value(dn: &str, attr: &str) -> Option<String> {
    let (key, rest) = dn.trim().split_once('=')?;
    if !key.trim().eq_ignore_ascii_case(attr) {
        return None;
    }
    let mut value = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' | '+' => break,
            '\\' => {
                let a = chars.next()?;
                match chars.peek().copied() {
                    Some(b) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {
                        chars.next();
                        let byte = u8::from_str_radix(&format!("{a}{b}"), 16).ok()?;
                        // Multi-byte UTF-8 escapes are rare in group names;
                        // keep ASCII ones exact and others as written.
                        if byte.is_ascii() {
                            value.push(char::from(byte));
                        } else {
                            value.push('\\');
                            value.push(a);
                            value.push(b);
                        }
                    }
                    _ => value.push(a),
                }
            }
            c => value.push(c),
        }
    }
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_rdn_names_a_group() {
        let cases = [
            ("cn=sales,ou=groups,dc=example,dc=com", "cn", Some("sales")),
            ("CN=Sales Team,OU=Groups,DC=corp", "cn", Some("Sales Team")),
            ("cn=a\\,b,dc=x", "cn", Some("a,b")),
            ("cn=a\\2Cb,dc=x", "cn", Some("a,b")),
            ("cn=x+uid=y,dc=x", "cn", Some("x")),
            ("ou=sales,dc=x", "cn", None),
            ("cn=,dc=x", "cn", None),
            ("nonsense", "cn", None),
        ];
        for (dn, attr, want) in cases {
            assert_eq!(first_rdn_value(dn, attr).as_deref(), want, "{dn}");
        }
    }

    #[test]
    fn group_keys_compare_names_and_dns_without_case_or_spaces() {
        assert_eq!(group_key(" Sales ").as_deref(), Some("sales"));
        assert_eq!(
            group_key("CN=Sales, OU=Groups , DC=Corp").as_deref(),
            Some("cn=sales,ou=groups,dc=corp")
        );
        assert_eq!(
            normalize_dn("cn = a\\, b ,dc=x"),
            normalize_dn("CN=a\\, b,DC=x")
        );
        assert_eq!(group_key("  "), None);
    }

    /// A directory at `addr` from a configuration text.
    fn directory(addr: std::net::SocketAddr, extra: &str) -> Directory {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        let text = format!("[ldap]\nurl = \"ldap://{addr}\"\nbase_dn = \"dc=x\"\n{extra}");
        std::fs::write(&path, text).expect("write");
        let cfg = crate::config::Config::load(Some(&path)).expect("config");
        Directory::new(cfg.ldap.as_ref().expect("ldap")).expect("directory")
    }

    #[tokio::test]
    async fn a_query_nobody_waits_for_is_forgotten_and_a_silent_directory_times_out() {
        // Accepts, then never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                kept.push(s);
            }
        });
        let d = Arc::new(directory(addr, "timeout_ms = 300\ncache_ttl_ms = 60000\n"));
        let user: Arc<str> = Arc::from("alice");
        let waiting = {
            let (d, user) = (Arc::clone(&d), Arc::clone(&user));
            tokio::spawn(async move { d.groups(&user).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(lock(&d.inflight).len(), 1);
        waiting.abort();
        let _ = waiting.await;
        assert!(
            lock(&d.inflight).is_empty(),
            "a cancelled query stays behind"
        );
        // Waited for: the timeout applies the fallback, which is cached.
        let started = Instant::now();
        let (groups, source) = d.groups(&user).await;
        assert_eq!((groups.len(), source), (0, Source::Unavailable));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(lock(&d.inflight).is_empty());
        assert_eq!(d.groups(&user).await.1, Source::Hit);
        held.abort();
    }

    #[test]
    fn a_full_cache_makes_room() {
        let now = Instant::now();
        let entry = |secs| Entry {
            groups: Groups::from(Vec::new()),
            expires: now + Duration::from_secs(secs),
            last_good: None,
        };
        let mut cache = HashMap::new();
        cache.insert(Arc::from("old"), entry(1));
        cache.insert(Arc::from("new"), entry(9));
        make_room(&mut cache, now);
        assert_eq!(cache.len(), 1);
        assert!(cache.contains_key("new"));
    }
}
