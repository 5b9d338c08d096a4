//! Proxy authentication: Basic credentials in `Proxy-Authorization` checked
//! against salted Argon2id hashes. Argon2 is slow on purpose, so a verified
//! credential is remembered (by its SHA-256, never in clear) for the life of
//! the engine snapshot; a reload forgets everything.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, PasswordHash};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::config::Auth;

/// Remembered credentials per snapshot; the cache is cleared when full.
const CACHE_ENTRIES: usize = 4096;

/// (engine generation, SHA-256 of the header value) → user.
type Entries = HashMap<(u64, [u8; 32]), Arc<str>>;

#[derive(Default)]
pub struct AuthCache {
    entries: Mutex<Entries>,
}

/// What a request's credentials say.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    User(Arc<str>),
    Missing,
    Wrong,
}

impl AuthCache {
    /// Check a `Proxy-Authorization` value against the users of `auth`.
    pub fn check(&self, auth: &Auth, generation: u64, header: Option<&[u8]>) -> AuthOutcome {
        let Some(value) = header else {
            return AuthOutcome::Missing;
        };
        let key = (generation, Sha256::digest(value).into());
        if let Some(user) = self.lock().get(&key) {
            return AuthOutcome::User(Arc::clone(user));
        }
        let Some((user, password)) = parse_basic(value) else {
            return AuthOutcome::Wrong;
        };
        let Some(hash) = auth.users.get(&user) else {
            // Spend the same time as a wrong password for a known user, so
            // timing does not tell which names exist.
            let _ = verify(DUMMY_HASH, &password);
            return AuthOutcome::Wrong;
        };
        if !verify(hash, &password) {
            return AuthOutcome::Wrong;
        }
        let user: Arc<str> = Arc::from(user);
        let mut cache = self.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&user));
        AuthOutcome::User(user)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fixed hash of a random password, verified against for unknown users.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$DDVfE0E2J6KZwlWQIRy4pMNm8AGUvrQrjHu6UxGH4BA";

/// Constant-time comparison is argon2's (the digests are compared with
/// `subtle`).
fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// `Basic base64(user:password)`.
pub fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// A users-file line for `user` with a fresh salt.
pub fn hash_line(user: &str, password: &str) -> Result<String, String> {
    let mut salt_bytes = [0u8; 16];
    getrandom_fill(&mut salt_bytes)?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| e.to_string())?;
    Ok(format!("{user}:{hash}"))
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), String> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| format!("no randomness: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_with(user: &str, password: &str) -> Auth {
        let line = hash_line(user, password).expect("hash");
        let (u, h) = line.split_once(':').expect("line");
        Auth {
            realm: "test".into(),
            users_file: "users".into(),
            users: [(u.to_string(), h.to_string())].into_iter().collect(),
            basic: true,
            negotiate: None,
        }
    }

    fn basic(creds: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
        .into_bytes()
    }

    #[test]
    fn basic_credentials_are_checked_and_cached() {
        let auth = auth_with("alice", "s3cret:with colon");
        let cache = AuthCache::default();
        let good = basic("alice:s3cret:with colon");
        assert_eq!(
            cache.check(&auth, 1, Some(&good)),
            AuthOutcome::User("alice".into())
        );
        assert_eq!(
            cache.check(&auth, 1, Some(&good)),
            AuthOutcome::User("alice".into())
        );
        assert_eq!(
            cache.check(&auth, 1, Some(&basic("alice:wrong"))),
            AuthOutcome::Wrong
        );
        assert_eq!(
            cache.check(&auth, 1, Some(&basic("bob:s3cret"))),
            AuthOutcome::Wrong
        );
        assert_eq!(
            cache.check(&auth, 1, Some(b"Bearer xyz")),
            AuthOutcome::Wrong
        );
        assert_eq!(
            cache.check(&auth, 1, Some(b"Basic !!!")),
            AuthOutcome::Wrong
        );
        assert_eq!(cache.check(&auth, 1, None), AuthOutcome::Missing);
    }

    #[test]
    fn dummy_hash_is_valid() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
