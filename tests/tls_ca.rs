//! TLS inspection's CA: `chatwall ca init|show` through the built binary,
//! and leaves minted by `tls_inspect::Minter` checked by OpenSSL, by
//! rustls's webpki verifier and field by field with x509-parser; the leaf
//! cache's bound, coalescing and keying.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use base64::Engine as _;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use chatwall::tls_inspect::{Authority, CacheResult, Minter};

use crate::support::skip_or_fail;

const DAY: i64 = 86_400;

/// One run of the binary with no `CHATWALL*` variable of the caller's.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn chatwall(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatwall"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHATWALL") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("chatwall runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn have_openssl() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run openssl; (success, stdout + stderr).
fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// A CA made by `chatwall ca init` in a new directory.
fn init_ca() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path").to_string();
    let run = chatwall(&["ca", "init", "--dir", &d, "--cn", "chatwall test CA"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    (dir, cert, key)
}

/// A rustls verifier trusting `anchor` only.
fn verifier(anchor: &CertificateDer<'static>) -> Arc<rustls::client::WebPkiServerVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(anchor.clone()).expect("anchor");
    rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier")
}

fn verify_for(
    v: &rustls::client::WebPkiServerVerifier,
    chain: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), rustls::Error> {
    let server = ServerName::try_from(name.to_string()).expect("server name");
    v.verify_server_cert(&chain[0], &chain[1..], &server, &[], UnixTime::now())
        .map(|_| ())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn minter(cert: &Path, key: &Path, entries: usize) -> Minter {
    let ca = Authority::load(cert, key).expect("CA loads");
    Minter::new(Arc::new(ca), entries, Duration::from_secs(3600))
}

#[test]
fn ca_init_writes_pem_der_and_a_0600_key() {
    let (dir, cert, key) = init_ca();
    let cer = dir.path().join("ca.cer");
    assert_eq!(mode(&key), 0o600);
    assert!(cert.is_file() && cer.is_file());
    // ca.cer is the DER of ca.pem.
    let pem_der = rustls::pki_types::pem::PemObject::from_pem_file(&cert)
        .map(|c: CertificateDer<'static>| c.to_vec())
        .expect("ca.pem parses");
    assert_eq!(std::fs::read(&cer).expect("read ca.cer"), pem_der);
    let (_, x509) = X509Certificate::from_der(&pem_der).expect("parses");
    let bc = x509.basic_constraints().expect("bc").expect("present");
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = x509.key_usage().expect("ku").expect("present");
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(x509.iter_extensions().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::SubjectKeyIdentifier(_)
    )));
    assert_eq!(x509.subject().to_string(), "CN=chatwall test CA");
    let days = (x509.validity().not_after.timestamp() - now()) / DAY;
    assert!((3648..=3650).contains(&days), "{days}");
}

#[test]
fn ca_init_prints_fingerprints_and_trust_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let run = chatwall(&["ca", "init", "--dir", d, "--days", "30"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for want in [
        "SHA-256 fingerprint: ",
        "SHA-1 fingerprint: ",
        "update-ca-certificates",
        "certutil -addstore Root",
        "security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain",
        "ImportEnterpriseRoots",
        "Certificates.Install",
        "certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n chatwall",
        "CN=chatwall inspection CA ",
    ] {
        assert!(run.stdout.contains(want), "{want:?} in {}", run.stdout);
    }
    let ca =
        Authority::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).expect("loads");
    assert!(run.stdout.contains(&ca.sha256_fingerprint()));
    assert!(run.stdout.contains(&ca.sha1_fingerprint()));
    let days = (ca.not_after_unix() - now()) / DAY;
    assert!((28..=30).contains(&days), "{days}");
}

#[test]
fn ca_init_refuses_to_overwrite_without_force() {
    let (dir, cert, key) = init_ca();
    let d = dir.path().to_str().expect("utf-8 path");
    let before = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    let run = chatwall(&["ca", "init", "--dir", d]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(run.stderr.contains("ca.key"), "{}", run.stderr);
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
    let after = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    assert_eq!(before, after, "nothing was touched");

    // Only the certificate left: still refused, naming it.
    std::fs::remove_file(&key).unwrap();
    std::fs::remove_file(dir.path().join("ca.cer")).unwrap();
    let run = chatwall(&["ca", "init", "--dir", d]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("ca.pem"), "{}", run.stderr);
    assert!(!key.exists());
}

#[test]
fn ca_init_force_replaces_with_a_0600_key() {
    let (dir, cert, key) = init_ca();
    let d = dir.path().to_str().expect("utf-8 path");
    let before = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    // A key someone loosened is replaced by one with the right mode.
    chmod(&key, 0o644);
    let run = chatwall(&["ca", "init", "--dir", d, "--force"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_ne!(before.0, std::fs::read(&cert).unwrap());
    assert_ne!(before.1, std::fs::read(&key).unwrap());
    assert_eq!(mode(&key), 0o600);
    Authority::load(&cert, &key).expect("the new pair loads");
}

#[test]
fn ca_init_bad_usage_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    for args in [
        vec!["ca", "init", "--dir", d, "--days", "0"],
        vec!["ca", "init", "--dir", d, "--cn", ""],
        vec![
            "ca", "show", "--dir", d, "--cert", "x.pem", "--key", "x.key",
        ],
        vec!["ca", "show", "--cert", "x.pem"],
    ] {
        let run = chatwall(&args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn ca_show_sha256_is_openssls() {
    if !have_openssl() {
        return skip_or_fail("openssl is not installed");
    }
    let (dir, cert, _) = init_ca();
    let run = chatwall(&["ca", "show", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (ok, out) = openssl(&[
        "x509",
        "-noout",
        "-fingerprint",
        "-sha256",
        "-in",
        cert.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let want = out.trim().rsplit('=').next().unwrap().to_string();
    assert!(
        run.stdout
            .contains(&format!("SHA-256 fingerprint: {want}\n")),
        "{want} in {}",
        run.stdout
    );
    let (_, sha1) = openssl(&[
        "x509",
        "-noout",
        "-fingerprint",
        "-sha1",
        "-in",
        cert.to_str().unwrap(),
    ]);
    let sha1 = sha1.trim().rsplit('=').next().unwrap().to_string();
    assert!(run.stdout.contains(&format!("SHA-1 fingerprint: {sha1}\n")));
    for want in [
        "subject: CN=chatwall test CA",
        "ECDSA P-256",
        "not before: ",
        "days left",
    ] {
        assert!(run.stdout.contains(want), "{want:?} in {}", run.stdout);
    }
}

#[test]
fn ca_show_exits_1_for_a_loose_or_foreign_key() {
    let (dir, cert, key) = init_ca();
    let d = dir.path().to_str().unwrap();
    chmod(&key, 0o640);
    let run = chatwall(&["ca", "show", "--dir", d]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(
        run.stderr.contains(key.to_str().unwrap()) && run.stderr.contains("0640"),
        "{}",
        run.stderr
    );
    chmod(&key, 0o600);

    let (_other, _, other_key) = init_ca();
    let run = chatwall(&[
        "ca",
        "show",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        other_key.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(
        run.stderr.contains("does not belong") && run.stderr.contains(other_key.to_str().unwrap()),
        "{}",
        run.stderr
    );
}

#[test]
fn a_minted_leaf_verifies_with_openssl_and_webpki() {
    let (dir, cert, key) = init_ca();
    let m = minter(&cert, &key, 100);
    let names = vec!["a.example.test".to_string(), "*.b.example.test".to_string()];
    let (ck, result) = m.leaf("chat.example.test", &names, [7; 32]).expect("leaf");
    assert_eq!(result, CacheResult::Miss);
    assert_eq!(ck.cert.len(), 1, "a self-signed CA is not sent");

    let v = verifier(m.authority().cert_der());
    for name in ["a.example.test", "chat.example.test", "x.b.example.test"] {
        verify_for(&v, &ck.cert, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for name in ["other.example.test", "b.example.test", "y.x.b.example.test"] {
        assert!(verify_for(&v, &ck.cert, name).is_err(), "{name}");
    }
    // The key signs handshakes with ECDSA P-256.
    assert!(ck
        .key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .is_some());

    if !have_openssl() {
        return skip_or_fail("openssl is not installed");
    }
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&leaf, to_pem(&ck.cert[0])).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-purpose",
        "sslserver",
        "-x509_strict",
        "-CAfile",
        cert.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok && out.contains(": OK"), "{out}");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        cert.to_str().unwrap(),
        "-verify_hostname",
        "chat.example.test",
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}

#[test]
fn a_minted_leaf_has_the_fields_of_the_design() {
    let (_dir, cert, key) = init_ca();
    let m = minter(&cert, &key, 100);
    let names = vec![
        "a.example.test".to_string(),
        "*.b.example.test".to_string(),
        "A.Example.Test.".to_string(),
        "not a name".to_string(),
        "192.0.2.7".to_string(),
    ];
    let (ck, _) = m.leaf("Chat.Example.Test", &names, [1; 32]).expect("leaf");
    let (_, leaf) = X509Certificate::from_der(&ck.cert[0]).expect("parses");
    let (_, ca) = X509Certificate::from_der(m.authority().cert_der()).expect("parses");

    assert_eq!(leaf.subject().to_string(), "CN=chat.example.test");
    assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
    let san = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    let got: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|g| match g {
            GeneralName::DNSName(s) => format!("dns:{s}"),
            GeneralName::IPAddress(b) => format!("ip:{b:?}"),
            other => format!("other:{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        [
            "dns:chat.example.test",
            "dns:a.example.test",
            "dns:*.b.example.test",
            "ip:[192, 0, 2, 7]"
        ]
    );
    let eku = leaf.extended_key_usage().expect("eku").expect("present");
    assert!(eku.value.server_auth && !eku.value.client_auth && !eku.value.any);
    assert!(eku.value.other.is_empty());
    let ku = leaf.key_usage().expect("ku").expect("present");
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    let bc = leaf.basic_constraints().expect("bc").expect("present");
    assert!(!bc.value.ca);

    let ca_ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("CA SKI");
    let aki = leaf
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("AKI");
    assert_eq!(aki, ca_ski);
    assert!(!leaf.iter_extensions().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::SubjectKeyIdentifier(_)
    )));

    let t = now();
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    assert!((t - DAY - 300..=t - DAY + 5).contains(&nb), "{nb} vs {t}");
    assert!(
        (t + 30 * DAY - 300..=t + 30 * DAY + 5).contains(&na),
        "{na} vs {t}"
    );

    // 128-bit random serials, positive, never repeated.
    let serial = leaf.raw_serial().to_vec();
    assert!(serial.len() <= 16 && serial.len() >= 12, "{serial:?}");
    assert!(serial[0] & 0x80 == 0);
    let (other, _) = m.leaf("other.example.test", &[], [1; 32]).expect("leaf");
    let (_, other) = X509Certificate::from_der(&other.cert[0]).expect("parses");
    assert_ne!(other.raw_serial(), serial.as_slice());
    // A fresh key per leaf.
    assert_ne!(
        other.public_key().subject_public_key.data,
        leaf.public_key().subject_public_key.data
    );
}

#[test]
fn a_leaf_for_an_ip_literal_carries_an_ip_san() {
    let (_dir, cert, key) = init_ca();
    let m = minter(&cert, &key, 10);
    let v = verifier(m.authority().cert_der());
    for ip in ["192.0.2.10", "[2001:db8::1]"] {
        let (ck, _) = m.leaf(ip, &[], [0; 32]).expect("leaf");
        verify_for(&v, &ck.cert, ip.trim_matches(['[', ']'])).expect(ip);
    }
}

#[test]
fn a_long_sni_has_no_cn_and_a_critical_san() {
    let (_dir, cert, key) = init_ca();
    let m = minter(&cert, &key, 10);
    let sni = format!("{}.{}.example.test", "a".repeat(40), "b".repeat(40));
    let (ck, _) = m.leaf(&sni, &[], [0; 32]).expect("leaf");
    let (_, leaf) = X509Certificate::from_der(&ck.cert[0]).expect("parses");
    assert_eq!(leaf.subject().iter().count(), 0);
    let san = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    assert!(san.critical);
    verify_for(&verifier(m.authority().cert_der()), &ck.cert, &sni).expect("verifies");
}

#[test]
fn one_hundred_threads_missing_one_name_mint_once() {
    let (_dir, cert, key) = init_ca();
    let m = Arc::new(minter(&cert, &key, 1000));
    m.leaf("warm.example.test", &[], [0; 32]).expect("leaf");
    let before = m.minted();
    let barrier = Arc::new(Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let (m, barrier) = (m.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                m.leaf("new.example.test", &["alt.example.test".into()], [9; 32])
                    .expect("leaf")
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("join"))
        .collect();
    assert_eq!(m.minted(), before + 1);
    assert_eq!(
        results
            .iter()
            .filter(|(_, r)| *r == CacheResult::Miss)
            .count(),
        1
    );
    assert!(results.iter().all(|(ck, _)| Arc::ptr_eq(ck, &results[0].0)));
}

#[test]
fn the_cache_stays_within_its_bound() {
    let (_dir, cert, key) = init_ca();
    for max in [1, 50, 100] {
        let m = minter(&cert, &key, max);
        for i in 0..3 * max {
            m.leaf(&format!("h{i}.example.test"), &[], [0; 32])
                .expect("leaf");
            assert!(m.len() <= max, "{} > {max} after {i}", m.len());
        }
        assert_eq!(m.minted(), 3 * max as u64);
        assert!(!m.is_empty());
    }
    let m = minter(&cert, &key, 0);
    m.leaf("a.example.test", &[], [0; 32]).expect("leaf");
    let (_, r) = m.leaf("a.example.test", &[], [0; 32]).expect("leaf");
    assert_eq!((r, m.len(), m.minted()), (CacheResult::Miss, 0, 2));
}

#[test]
fn a_changed_upstream_certificate_mints_anew() {
    let (_dir, cert, key) = init_ca();
    let m = minter(&cert, &key, 100);
    let (a, r1) = m.leaf("chat.example.test", &[], [1; 32]).expect("leaf");
    let (b, r2) = m.leaf("CHAT.example.test.", &[], [1; 32]).expect("leaf");
    assert_eq!((r1, r2), (CacheResult::Miss, CacheResult::Hit));
    assert!(Arc::ptr_eq(&a, &b));
    let (c, r3) = m.leaf("chat.example.test", &[], [2; 32]).expect("leaf");
    assert_eq!(r3, CacheResult::Miss);
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(m.minted(), 2);
}

#[test]
fn entries_expire_after_the_ttl() {
    let (_dir, cert, key) = init_ca();
    let ca = Arc::new(Authority::load(&cert, &key).expect("loads"));
    let m = Minter::new(ca, 100, Duration::from_millis(200));
    let (_, r) = m.leaf("t.example.test", &[], [0; 32]).expect("leaf");
    assert_eq!(r, CacheResult::Miss);
    let (_, r) = m.leaf("t.example.test", &[], [0; 32]).expect("leaf");
    assert_eq!(r, CacheResult::Hit);
    std::thread::sleep(Duration::from_millis(300));
    let (_, r) = m.leaf("t.example.test", &[], [0; 32]).expect("leaf");
    assert_eq!(r, CacheResult::Miss);
    assert_eq!(m.minted(), 2);
    assert!(m.len() <= 1);
}

#[test]
fn load_refuses_a_key_others_may_read() {
    let (_dir, cert, key) = init_ca();
    chmod(&key, 0o644);
    let e = Authority::load(&cert, &key).expect_err("refused");
    assert!(
        e.contains(key.to_str().unwrap()) && e.contains("0644"),
        "{e}"
    );
}

#[test]
fn load_refuses_a_certificate_that_is_no_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["leaf.example.test".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    chmod(&key, 0o600);
    let e = Authority::load(&cert, &key).expect_err("refused");
    assert!(
        e.contains(cert.to_str().unwrap()) && e.contains("not a CA"),
        "{e}"
    );
}

#[test]
fn load_refuses_a_key_of_another_ca() {
    let (_a, cert, _) = init_ca();
    let (_b, _, other_key) = init_ca();
    let e = Authority::load(&cert, &other_key).expect_err("refused");
    assert!(
        e.contains(other_key.to_str().unwrap()) && e.contains("does not belong"),
        "{e}"
    );
}

#[test]
fn load_refuses_an_expired_ca_and_show_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let ca = params.self_signed(&key).unwrap();
    let (cert, key_path) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, ca.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    chmod(&key_path, 0o600);
    let e = Authority::load(&cert, &key_path).expect_err("refused");
    assert!(
        e.contains(cert.to_str().unwrap()) && e.contains("expired"),
        "{e}"
    );
    let run = chatwall(&["ca", "show", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.contains("EXPIRED"), "{}", run.stdout);
    assert!(run.stderr.contains("expired"), "{}", run.stderr);
}

/// A CA made by `openssl req -x509` with `newkey`, its key rewritten by
/// `convert` (e.g. to PKCS#1 or SEC1) when given.
fn openssl_ca(
    dir: &Path,
    newkey: &[&str],
    subj: &str,
    convert: Option<&[&str]>,
) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(newkey);
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
        "-days",
        "30",
        "-subj",
        subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    let (ok, out) = openssl(&args);
    assert!(ok, "{out}");
    if let Some(convert) = convert {
        let converted = dir.join("converted.key");
        let mut args = convert.to_vec();
        args.extend_from_slice(&[
            "-in",
            key.to_str().unwrap(),
            "-out",
            converted.to_str().unwrap(),
        ]);
        let (ok, out) = openssl(&args);
        assert!(ok, "{out}");
        std::fs::rename(&converted, &key).unwrap();
    }
    chmod(&key, 0o600);
    (cert, key)
}

/// Mint under the CA in `cert`/`key` and check the leaf with webpki and
/// `openssl verify`.
fn mints_verifiable_leaves(dir: &Path, cert: &Path, key: &Path, key_type: &str) {
    let ca = Authority::load(cert, key).unwrap_or_else(|e| panic!("{key_type}: {e}"));
    assert!(ca.key_type().starts_with(key_type), "{}", ca.key_type());
    let m = Minter::new(Arc::new(ca), 10, Duration::from_secs(60));
    let (ck, _) = m
        .leaf("chat.example.test", &["a.example.test".into()], [0; 32])
        .expect("leaf");
    let v = verifier(m.authority().cert_der());
    verify_for(&v, &ck.cert, "a.example.test").unwrap_or_else(|e| panic!("{key_type}: {e}"));
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, to_pem(&ck.cert[0])).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-purpose",
        "sslserver",
        "-CAfile",
        cert.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok && out.contains(": OK"), "{key_type}: {out}");
}

/// Key type shown, `openssl req` key options, subject, key conversion.
type OpensslCa<'a> = (&'a str, &'a [&'a str], &'a str, Option<&'a [&'a str]>);

#[test]
fn load_accepts_openssl_cas_with_rsa_and_p384_keys_in_any_pem_form() {
    if !have_openssl() {
        return skip_or_fail("openssl is not installed");
    }
    let cases: [OpensslCa; 4] = [
        // PKCS#8, as openssl req writes it.
        (
            "RSA 2048",
            &["-newkey", "rsa:2048"],
            "/CN=Test RSA CA",
            None,
        ),
        // PKCS#1 ("BEGIN RSA PRIVATE KEY").
        (
            "RSA 2048",
            &["-newkey", "rsa:2048"],
            "/C=DE/O=Example Org/CN=Test RSA CA",
            Some(&["rsa", "-traditional"]),
        ),
        // SEC1 ("BEGIN EC PRIVATE KEY").
        (
            "ECDSA P-384",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            "/O=Example/OU=Security/CN=Test P-384 CA",
            Some(&["ec"]),
        ),
        (
            "ECDSA P-256",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "/CN=Test P-256 CA",
            None,
        ),
    ];
    for (key_type, newkey, subj, convert) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = openssl_ca(dir.path(), newkey, subj, convert);
        mints_verifiable_leaves(dir.path(), &cert, &key, key_type);
    }
}

#[test]
fn an_intermediate_ca_is_sent_after_the_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    root.distinguished_name = rcgen::DistinguishedName::new();
    root.distinguished_name
        .push(rcgen::DnType::CommonName, "Test Root");
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root = root.self_signed(&root_key).unwrap();
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut int = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    int.distinguished_name = rcgen::DistinguishedName::new();
    int.distinguished_name
        .push(rcgen::DnType::CommonName, "Test Inspection Intermediate");
    int.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    int.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    int.use_authority_key_identifier_extension = true;
    let int = int.signed_by(&int_key, &root, &root_key).unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, format!("{}{}", int.pem(), root.pem())).unwrap();
    std::fs::write(&key, int_key.serialize_pem()).unwrap();
    chmod(&key, 0o600);

    let m = minter(&cert, &key, 10);
    let (ck, _) = m.leaf("chat.example.test", &[], [0; 32]).expect("leaf");
    assert_eq!(ck.cert.len(), 3);
    assert_eq!(ck.cert[1].as_ref(), int.der().as_ref());
    assert_eq!(ck.cert[2].as_ref(), root.der().as_ref());
    // Clients that trust only the root verify the leaf.
    verify_for(&verifier(root.der()), &ck.cert, "chat.example.test").expect("verifies");
}
