//! What decrypting flows needs at run time, built with each engine (so a
//! reload re-reads the CA and starts with an empty certificate cache): the
//! minter under the operator's CA, and the TLS client configurations that
//! verify upstream servers against the system's roots and the operator's
//! internal CAs.
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::{Authority, Minter};
use crate::config::TlsInspect;

/// ALPN this proxy follows inside a decrypted flow.
pub const HTTP1: &[u8] = b"http/1.1";

pub struct Interception {
    pub minter: Minter,
    /// Upstream handshakes offering http/1.1 (the client offered it).
    pub upstream_http1: Arc<ClientConfig>,
    /// Upstream handshakes offering no ALPN (neither did the client).
    pub upstream_plain: Arc<ClientConfig>,
    pub provider: Arc<CryptoProvider>,
    /// Trust anchors loaded (system and operator's), for the log at start.
    pub roots: usize,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("roots", &self.roots)
            .finish()
    }
}

impl Interception {
    /// Load the CA and the upstream trust anchors. Errors name the file.
    pub fn load(t: &TlsInspect) -> Result<Interception, String> {
        let authority = Arc::new(Authority::load(&t.ca_cert, &t.ca_key)?);
        let mut roots = RootCertStore::empty();
        // The system's store, as curl and the package manager on the host
        // use it; certificates it cannot parse are skipped.
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        let mut total = added;
        if let Some(path) = &t.upstream_extra_ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no PEM certificate", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                total += 1;
            }
        }
        if roots.is_empty() {
            return Err(
                "tls_inspect: no trust anchor for upstream servers (the system store is empty and upstream_extra_ca is unset)"
                    .into(),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, String> {
            let mut cfg = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            cfg.alpn_protocols = alpn;
            Ok(Arc::new(cfg))
        };
        Ok(Interception {
            minter: Minter::new(authority, t.cert_cache_entries, t.cert_cache_ttl),
            upstream_http1: client(vec![HTTP1.to_vec()])?,
            upstream_plain: client(Vec::new())?,
            provider,
            roots: total,
        })
    }
}
