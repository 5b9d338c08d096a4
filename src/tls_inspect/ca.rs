//! The local CA: loaded from the operator's PEM files and checked before a
//! single leaf is minted (a key others can read, a certificate that is no
//! CA, a key that is not the certificate's, an expired CA are refused, each
//! naming its file), or made new for `chatwall ca init`.
//!
//! Keys are read by rustls (PKCS#8, SEC1 or PKCS#1; P-256, P-384 or RSA) and
//! sign through rcgen's remote-key interface, so every key ring can sign
//! with works without converting it. The CA's subject and subject key
//! identifier are read back with rcgen (`from_ca_cert_der`), and a probe
//! leaf at load proves that a minted leaf's issuer name is the CA's subject
//! byte for byte: chain builders (webpki, OpenSSL) compare names as bytes.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use sha2::Digest;
use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo, X509Certificate};

/// The certificate authority leaves are minted under.
pub struct Authority {
    cert_path: PathBuf,
    /// The CA certificate (the first of the certificate file).
    ca_der: CertificateDer<'static>,
    /// What a handshake sends after the leaf: the CA itself when it is not
    /// self-signed (an intermediate the clients may not hold), then the
    /// further certificates of the file, in file order.
    after_leaf: Vec<CertificateDer<'static>>,
    /// The CA as rcgen sees it: subject and subject key identifier, used as
    /// the issuer of every leaf.
    issuer: rcgen::Certificate,
    /// The CA key, signing through rustls's ring signer.
    key: KeyPair,
    /// Whether the CA has a subject key identifier for the leaves'
    /// authority key identifier to repeat.
    has_ski: bool,
    key_type: String,
    subject: String,
    not_before: i64,
    not_after: i64,
    sha256: [u8; 32],
    sha1: Vec<u8>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("cert", &self.cert_path)
            .field("subject", &self.subject)
            .field("key_type", &self.key_type)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// "AB:CD:..." as `openssl x509 -fingerprint` prints a digest.
pub fn colon_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// A random serial number: 16 bytes from the system's CSPRNG, top bit
/// cleared so the DER INTEGER stays positive within 16 bytes (RFC 5280
/// 4.1.2.2; CA/B Forum BR 7.1: at least 64 bits of entropy). Random, not
/// counted: a restart must never reissue an issuer+serial pair (Firefox
/// refuses a second certificate with the same pair).
pub(crate) fn random_serial() -> Result<SerialNumber, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random number generator failed".to_string())?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The CA key as rcgen's remote key: rustls's ring signer for the one
/// scheme the key's type fixes.
struct CaSigner {
    key: Arc<dyn SigningKey>,
    scheme: SignatureScheme,
    alg: &'static rcgen::SignatureAlgorithm,
    /// The subjectPublicKey bits (EC point, or RSAPublicKey DER).
    public_raw: Vec<u8>,
}

impl rcgen::RemoteKeyPair for CaSigner {
    fn public_key(&self) -> &[u8] {
        &self.public_raw
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let signer = self
            .key
            .choose_scheme(&[self.scheme])
            .ok_or(rcgen::Error::RemoteKeyError)?;
        signer.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// Read a private key file that only its owner may read.
fn read_key_file(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown}: mode {mode:04o} lets group or others read the CA key; chmod 600 it"
            ));
        }
    }
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    let pem = std::fs::read(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{shown}: no PEM private key (PKCS#8, SEC1 or PKCS#1) in it: {e:?}"))
}

/// The certificates of a PEM file, in order; at least one.
fn read_cert_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: not a PEM certificate file: {e:?}"))?;
    if certs.is_empty() {
        return Err(format!("{shown}: no CERTIFICATE block in it"));
    }
    Ok(certs)
}

/// The key's type as the signer sees it, and the rcgen algorithm and
/// rustls scheme it signs certificates with.
fn key_kind(
    key: &dyn SigningKey,
) -> Option<(
    &'static str,
    SignatureScheme,
    &'static rcgen::SignatureAlgorithm,
)> {
    let candidates: [(&str, SignatureScheme, &rcgen::SignatureAlgorithm); 3] = [
        (
            "ECDSA P-256",
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &rcgen::PKCS_ECDSA_P256_SHA256,
        ),
        (
            "ECDSA P-384",
            SignatureScheme::ECDSA_NISTP384_SHA384,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ),
        (
            "RSA",
            SignatureScheme::RSA_PKCS1_SHA256,
            &rcgen::PKCS_RSA_SHA256,
        ),
    ];
    candidates
        .into_iter()
        .find(|(_, scheme, _)| key.choose_scheme(&[*scheme]).is_some())
}

impl Authority {
    /// Load a PEM CA certificate (first = the CA, further certs =
    /// intermediates sent after the leaf) and its PEM private key (PKCS#8,
    /// SEC1 or PKCS#1; P-256, P-384 or RSA). Refuses a key file that group
    /// or others may read, a certificate that is not a CA, a key that is not
    /// the certificate's, and an expired CA; every error names its file.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Authority, String> {
        let authority = Authority::load_any_time(cert_pem, key_pem)?;
        let now = now_unix();
        if authority.not_after <= now {
            return Err(format!(
                "{}: the CA expired at {}; make a new one (chatwall ca init) and deploy it",
                cert_pem.display(),
                unix_to_rfc3339(authority.not_after)
            ));
        }
        Ok(authority)
    }

    /// As [`Authority::load`] but whatever the date (for `chatwall ca show`,
    /// which reports an expired CA rather than refusing to describe it).
    pub fn load_any_time(cert_pem: &Path, key_pem: &Path) -> Result<Authority, String> {
        let cert_shown = cert_pem.display();
        let key_shown = key_pem.display();
        let certs = read_cert_file(cert_pem)?;
        let key_der = read_key_file(key_pem)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
            format!("{key_shown}: not a P-256, P-384 or RSA key that can sign: {e}")
        })?;
        let Some((kind, scheme, alg)) = key_kind(signing.as_ref()) else {
            return Err(format!(
                "{key_shown}: this key type cannot sign certificates browsers accept; use P-256, P-384 or RSA"
            ));
        };
        let spki = signing
            .public_key()
            .ok_or_else(|| format!("{key_shown}: cannot derive the public key"))?;
        let public_raw = match SubjectPublicKeyInfo::from_der(spki.as_ref()) {
            Ok((_, info)) => info.subject_public_key.data.to_vec(),
            Err(e) => return Err(format!("{key_shown}: cannot read its public key: {e}")),
        };

        let ca_der = certs[0].clone();
        let (_, x509) = X509Certificate::from_der(ca_der.as_ref())
            .map_err(|e| format!("{cert_shown}: the first certificate does not parse: {e}"))?;
        let is_ca = matches!(x509.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(format!(
                "{cert_shown}: not a CA certificate (basicConstraints CA:TRUE is missing)"
            ));
        }
        if let Ok(Some(ku)) = x509.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(format!(
                    "{cert_shown}: its key usage does not allow signing certificates (keyCertSign)"
                ));
            }
        }
        if x509.public_key().subject_public_key.data.as_ref() != public_raw.as_slice() {
            return Err(format!(
                "{key_shown}: this key does not belong to the certificate in {cert_shown}"
            ));
        }
        // rcgen keeps one attribute per RDN (and per attribute type); a
        // subject it cannot reproduce is refused here, and any other
        // difference by the probe below.
        if x509.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err(format!(
                "{cert_shown}: a multi-valued name in the CA's subject is not supported"
            ));
        }
        let key_type = match x509.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
            _ => kind.to_string(),
        };
        let subject = x509.subject().to_string();
        let not_before = x509.validity().not_before.timestamp();
        let not_after = x509.validity().not_after.timestamp();

        let key = KeyPair::from_remote(Box::new(CaSigner {
            key: signing,
            scheme,
            alg,
            public_raw,
        }))
        .map_err(|e| format!("{key_shown}: {e}"))?;
        let mut params = CertificateParams::from_ca_cert_der(&ca_der)
            .map_err(|e| format!("{cert_shown}: cannot use this CA certificate: {e}"))?;
        // Without a subject key identifier leaves carry no authority key
        // identifier rather than one that matches nothing.
        let has_ski = matches!(&params.key_identifier_method, KeyIdMethod::PreSpecified(id) if !id.is_empty());
        if !has_ski {
            params.key_identifier_method = KeyIdMethod::PreSpecified(Vec::new());
        }
        let issuer = params
            .self_signed(&key)
            .map_err(|e| format!("{key_shown}: cannot sign with this key: {e}"))?;

        let self_signed = x509.subject().as_raw() == x509.issuer().as_raw();
        let mut after_leaf = Vec::with_capacity(certs.len());
        if !self_signed {
            after_leaf.push(ca_der.clone());
        }
        after_leaf.extend(certs.iter().skip(1).cloned());
        let sha256: [u8; 32] = sha2::Sha256::digest(ca_der.as_ref()).into();
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, ca_der.as_ref())
            .as_ref()
            .to_vec();
        let authority = Authority {
            cert_path: cert_pem.to_path_buf(),
            ca_der: ca_der.clone(),
            after_leaf,
            issuer,
            key,
            has_ski,
            key_type,
            subject,
            not_before,
            not_after,
            sha256,
            sha1,
        };

        // The probe: a leaf signed now (or, for an expired CA, within its
        // validity) names the CA's subject exactly.
        let probe_at = now_unix().min(not_after - 1).max(not_before);
        let probe = authority
            .sign_leaf("probe.invalid", &[], probe_at)
            .map_err(|e| format!("{cert_shown}: cannot mint under this CA: {e}"))?;
        let (_, leaf) = X509Certificate::from_der(probe.der().as_ref())
            .map_err(|e| format!("{cert_shown}: a minted leaf does not parse: {e}"))?;
        if leaf.issuer().as_raw() != x509.subject().as_raw() {
            return Err(format!(
                "{cert_shown}: the CA's subject name cannot be reproduced byte for byte in a leaf's issuer; make the CA with chatwall ca init"
            ));
        }
        Ok(authority)
    }

    /// The CA certificate's notAfter, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
    }

    /// The CA certificate's notBefore, in seconds since the Unix epoch.
    pub fn not_before_unix(&self) -> i64 {
        self.not_before
    }

    /// SHA-256 of the CA certificate's DER, as `openssl x509 -noout
    /// -fingerprint -sha256` prints it ("AB:CD:...").
    pub fn sha256_fingerprint(&self) -> String {
        colon_hex(&self.sha256)
    }

    /// SHA-1 of the CA certificate's DER, as Windows' certificate dialogs
    /// and `openssl x509 -fingerprint -sha1` show it.
    pub fn sha1_fingerprint(&self) -> String {
        colon_hex(&self.sha1)
    }

    /// The CA's subject, as OpenSSL's one-line form (`CN=...`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// "ECDSA P-256", "ECDSA P-384" or "RSA <bits>".
    pub fn key_type(&self) -> &str {
        &self.key_type
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The certificates a handshake sends after a minted leaf.
    pub fn chain_after_leaf(&self) -> &[CertificateDer<'static>] {
        &self.after_leaf
    }

    /// The file the CA certificate came from.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Sign a leaf for `names` (the first is the SNI and the CN when short
    /// enough) with a fresh P-256 key, valid from `now` − 1 day to
    /// min(`now` + 30 days, the CA's notAfter).
    pub(crate) fn sign_leaf(
        &self,
        sni: &str,
        names: &[crate::tls_inspect::mint::LeafName],
        now: i64,
    ) -> Result<crate::tls_inspect::mint::SignedLeaf, String> {
        crate::tls_inspect::mint::sign_leaf(
            crate::tls_inspect::mint::Signer {
                issuer: &self.issuer,
                key: &self.key,
                with_aki: self.has_ski,
                not_after: self.not_after,
            },
            sni,
            names,
            now,
        )
    }
}

/// A timestamp as RFC 3339 (UTC), or the number if out of range.
pub fn unix_to_rfc3339(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| ts.to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// A new CA for `chatwall ca init`.
pub struct NewCa {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// PKCS#8 PEM.
    pub key_pem: String,
    pub sha256: String,
    pub sha1: String,
    pub not_after: i64,
}

/// Make a CA: a fresh P-256 key, CN `cn`, valid from an hour ago (clock
/// skew between this host and its clients) for `days` days;
/// basicConstraints CA:TRUE pathlen 0 and key usage keyCertSign + cRLSign,
/// both critical, and a subject key identifier (RFC 5280 4.2.1.2) that the
/// leaves' authority key identifier repeats.
pub fn generate(cn: &str, days: u32) -> Result<NewCa, String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.serial_number = Some(random_serial()?);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot make the certificate: {e}"))?;
    let der = cert.der().to_vec();
    Ok(NewCa {
        cert_pem: cert.pem(),
        sha256: colon_hex(&sha2::Sha256::digest(&der)),
        sha1: colon_hex(
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der).as_ref(),
        ),
        cert_der: der,
        key_pem: key.serialize_pem(),
        not_after: (now + time::Duration::days(i64::from(days))).unix_timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }

    #[test]
    fn colon_hex_is_openssls_form() {
        assert_eq!(colon_hex(&[0xab, 0x01, 0xff]), "AB:01:FF");
        assert_eq!(colon_hex(&[]), "");
    }

    #[test]
    fn serials_are_positive_and_differ() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_eq!(a.to_bytes().len(), 16);
        assert!(a.to_bytes()[0] & 0x80 == 0);
        assert_ne!(a, b);
    }

    #[test]
    fn a_generated_ca_loads_with_its_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let new = generate("unit test CA", 10).unwrap();
        let (cert, key) = write_pair(dir.path(), &new.cert_pem, &new.key_pem);
        let ca = Authority::load(&cert, &key).unwrap();
        assert_eq!(ca.sha256_fingerprint(), new.sha256);
        assert_eq!(ca.sha1_fingerprint(), new.sha1);
        assert_eq!(ca.not_after_unix(), new.not_after);
        assert_eq!(ca.subject(), "CN=unit test CA");
        assert_eq!(ca.key_type(), "ECDSA P-256");
        assert!(ca.chain_after_leaf().is_empty());
        assert_eq!(ca.cert_der().as_ref(), new.cert_der.as_slice());
    }

    #[test]
    fn an_ed25519_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let (cert, key) = write_pair(dir.path(), &cert.pem(), &key.serialize_pem());
        let e = Authority::load(&cert, &key).unwrap_err();
        assert!(e.contains("ca.key") && e.contains("P-256"), "{e}");
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "no pem here\n", "nor here\n");
        let e = Authority::load(&cert, &key).unwrap_err();
        assert!(e.contains("ca.pem"), "{e}");
        let new = generate("unit test CA", 10).unwrap();
        let (cert, key) = write_pair(dir.path(), &new.cert_pem, "nor here\n");
        let e = Authority::load(&cert, &key).unwrap_err();
        assert!(e.contains("ca.key"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = Authority::load(&missing, &key).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
