//! Single sign-on: `Proxy-Authorization: Negotiate <base64>` (SPNEGO,
//! RFC 4559) with Kerberos, accepted by the system's GSS-API with the keys
//! of the proxy's `HTTP/` service principal (`[auth] keytab`).
//!
//! GSS calls block (they read the keytab and the replay cache), so they run
//! on tokio's blocking pool under a timeout, never on a worker. Tokens are
//! never remembered: each one is a fresh Kerberos authenticator that the
//! replay cache refuses a second time. A connection authenticated by
//! Negotiate stays authenticated (RFC 4559 §4: the scheme is connection
//! based; see `explicit::serve_with`).
use std::time::Duration;

use base64::Engine as _;
#[cfg(feature = "negotiate")]
use libgssapi::context::{SecurityContext, ServerCtx};
#[cfg(feature = "negotiate")]
use libgssapi::credential::{Cred, CredUsage};
#[cfg(feature = "negotiate")]
use libgssapi::name::Name;
#[cfg(feature = "negotiate")]
use libgssapi::oid::{OidSet, GSS_MECH_KRB5, GSS_MECH_SPNEGO, GSS_NT_KRB5_PRINCIPAL};

use crate::config::Negotiate;

/// The largest token accepted, decoded. Kerberos tickets with a large
/// Active Directory PAC (many groups) reach tens of KiB; the request head
/// limit bounds the header first.
pub const MAX_TOKEN: usize = 64 * 1024;

/// How long one handshake step may take (keytab and replay cache are local
/// files; no KDC is contacted by an acceptor).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The token of a `Negotiate` credential, if the value is one. `Some(None)`:
/// the scheme is Negotiate but the token is missing, too large or not
/// base64.
pub fn parse(value: &[u8]) -> Option<Option<Vec<u8>>> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
    if !scheme.eq_ignore_ascii_case("negotiate") {
        return None;
    }
    let rest = rest.trim();
    if rest.is_empty() || rest.len() > MAX_TOKEN.div_ceil(3) * 4 {
        return Some(None);
    }
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN),
    )
}

/// Accept one SPNEGO/Kerberos token: the client's principal
/// (`alice@EXAMPLE.COM`) once the context is complete. A token that needs
/// another round trip is refused: with Kerberos, SPNEGO completes in one
/// (the client's first token carries the AP-REQ). Blocking.
#[cfg(feature = "negotiate")]
pub fn accept(cfg: &Negotiate, token: &[u8]) -> Result<String, String> {
    let mut mechs = OidSet::new().map_err(|e| e.to_string())?;
    mechs.add(&GSS_MECH_SPNEGO).map_err(|e| e.to_string())?;
    mechs.add(&GSS_MECH_KRB5).map_err(|e| e.to_string())?;
    let name = if cfg.principal.is_empty() {
        None
    } else {
        Some(
            Name::new(cfg.principal.as_bytes(), Some(&GSS_NT_KRB5_PRINCIPAL))
                .map_err(|e| format!("negotiate_principal: {e}"))?,
        )
    };
    let cred = Cred::acquire(name.as_ref(), None, CredUsage::Accept, Some(&mechs))
        .map_err(|e| format!("no acceptor credentials (keytab): {e}"))?;
    let mut ctx = ServerCtx::new(Some(cred));
    ctx.step(token).map_err(|e| e.to_string())?;
    if !ctx.is_complete() {
        return Err("the handshake needs another round trip (not Kerberos?)".into());
    }
    let source = ctx.source_name().map_err(|e| e.to_string())?;
    let display = source.display_name().map_err(|e| e.to_string())?;
    String::from_utf8(display.to_vec()).map_err(|_| "a principal that is not UTF-8".into())
}

/// A build without the `negotiate` feature accepts no token (and its
/// configuration refuses `[auth] negotiate = true`).
#[cfg(not(feature = "negotiate"))]
pub fn accept(_cfg: &Negotiate, _token: &[u8]) -> Result<String, String> {
    Err("this build has no Negotiate support (build with --features negotiate)".into())
}

/// The user name for a principal: without its realm (the last `@` part)
/// when `strip_realm`.
pub fn user_name(principal: &str, strip_realm: bool) -> &str {
    match principal.rsplit_once('@') {
        Some((user, _)) if strip_realm && !user.is_empty() => user,
        _ => principal,
    }
}

/// `accept` on the blocking pool under [`TIMEOUT`].
pub async fn accept_async(cfg: &Negotiate, token: Vec<u8>) -> Result<String, String> {
    let cfg = cfg.clone();
    let job = tokio::task::spawn_blocking(move || accept(&cfg, &token));
    match tokio::time::timeout(TIMEOUT, job).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(format!("the handshake failed: {e}")),
        Err(_) => Err("the handshake timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_parsed_and_bounded() {
        assert_eq!(parse(b"Basic YTpi"), None);
        assert_eq!(parse(b"Negotiate"), Some(None));
        assert_eq!(parse(b"negotiate  !!!"), Some(None));
        assert_eq!(parse(b"Negotiate YWJj"), Some(Some(b"abc".to_vec())));
        let huge = format!(
            "Negotiate {}",
            base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_TOKEN + 1])
        );
        assert_eq!(parse(huge.as_bytes()), Some(None));
    }

    #[test]
    fn realms_are_stripped_when_asked() {
        assert_eq!(user_name("alice@EXAMPLE.COM", true), "alice");
        assert_eq!(user_name("alice@EXAMPLE.COM", false), "alice@EXAMPLE.COM");
        assert_eq!(user_name("a@b.example@EXAMPLE.COM", true), "a@b.example");
        assert_eq!(user_name("alice", true), "alice");
        assert_eq!(user_name("@EXAMPLE.COM", true), "@EXAMPLE.COM");
    }

    #[test]
    fn garbage_is_refused_without_a_keytab() {
        let cfg = Negotiate {
            keytab: Default::default(),
            principal: String::new(),
            strip_realm: true,
        };
        assert!(accept(&cfg, b"not a token").is_err());
    }
}
