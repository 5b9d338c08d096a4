//! Fuzz smoke test: the fuzz targets' logic under `cargo test`, on stable
//! Rust, without libFuzzer.
//!
//! Each target of `fuzz/` (client_hello, server_flight, payload, http_head,
//! signature_file, config) gets every seed of its corpus, then a bounded
//! number of deterministic inputs: pseudo-random bytes (xorshift) and seeds
//! mutated the way a fuzzer would (bit flips, interesting bytes, cuts,
//! duplicated and spliced ranges). None may panic or break an invariant.
//! The seeds and counts are fixed, so a failure reproduces; the failing
//! input is printed as hex.
//!
//! The logic is not copied: `fuzz/src/lib.rs` is included here as a module,
//! so the fuzz targets and this test run the same functions. Run alone with
//! `cargo test --test tests fuzz_smoke`. The corpus files under
//! `fuzz/seeds/` are written by the ignored test `write_fuzz_seeds`:
//! `cargo test --test tests fuzz_smoke::write_fuzz_seeds -- --ignored`.
//! The server flights under `tests/fixtures/tls/` that some seeds start
//! from are captured from rustls by the ignored test
//! `write_server_flight_fixtures`.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod targets;

use targets::fixtures::XorShift;
use targets::Seed;

/// Longest random or mutated input.
const MAX_LEN: usize = 4096;

/// The seeds of `target`.
fn seeds_of(target: &str) -> Vec<Seed> {
    targets::seeds(Path::new(env!("CARGO_MANIFEST_DIR")))
        .into_iter()
        .filter(|s| s.target == target)
        .collect()
}

/// Runs `target` on `data`; on a panic, fails naming the input.
fn check(target: &str, data: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| targets::run(target, data))).is_err() {
        panic!(
            "fuzz target `{target}` failed on {} bytes: {data:02x?}",
            data.len()
        );
    }
}

/// A fuzzer-style mutation of `seed`: one to four edits.
fn mutate(rng: &mut XorShift, seed: &[u8], others: &[Seed]) -> Vec<u8> {
    const INTERESTING: [u8; 8] = [0x00, 0x01, 0x16, 0x7f, 0x80, 0xfe, 0xff, b'\n'];
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => out.truncate(rng.below(len + 1)),
            3 if len > 0 => {
                // Remove a range.
                let start = rng.below(len);
                let end = start + rng.below(len - start + 1);
                out.drain(start..end);
            }
            4 if len > 0 => {
                // Duplicate a range in place.
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let copy = out[start..end].to_vec();
                let at = rng.below(len + 1);
                out.splice(at..at, copy);
            }
            5 if !others.is_empty() => {
                // Splice in part of another seed.
                let other = &others[rng.below(others.len())].bytes;
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(256)).min(other.len());
                let at = rng.below(len + 1);
                out.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let noise = rng.bytes(n);
                out.splice(at..at, noise);
            }
        }
    }
    out.truncate(MAX_LEN);
    out
}

/// How random inputs for a target are drawn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Any bytes.
    Binary,
    /// Mostly printable ASCII and line breaks, since a text format turns
    /// most binary noise away at its first invalid byte.
    Text,
}

/// Every seed, `random` random inputs (biased to short ones, half of them
/// starting like the seeds do) and `mutated` mutated seeds.
fn smoke(target: &str, input: Input, random: usize, mutated: usize) {
    const TEXT: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 \n\r\t\"'=[]{},.:;/*-_#<>";
    let seeds = seeds_of(target);
    assert!(!seeds.is_empty(), "no seeds for `{target}`");
    for seed in &seeds {
        check(target, &seed.bytes);
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for _ in 0..random {
        let len = if rng.below(4) == 0 {
            rng.below(MAX_LEN)
        } else {
            rng.below(96)
        };
        let mut data = rng.bytes(len);
        if input == Input::Text {
            for b in &mut data {
                if rng.below(32) != 0 {
                    *b = TEXT[usize::from(*b) % TEXT.len()];
                }
            }
        }
        // Half of them share a seed's first byte (0x16 for TLS, a letter
        // for text formats) so that they get past the first check.
        if let Some(first) = data.first_mut() {
            if rng.below(2) == 0 {
                *first = seeds[rng.below(seeds.len())]
                    .bytes
                    .first()
                    .copied()
                    .unwrap_or(0);
            }
        }
        check(target, &data);
    }
    for _ in 0..mutated {
        let seed = &seeds[rng.below(seeds.len())];
        check(target, &mutate(&mut rng, &seed.bytes, &seeds));
    }
}

#[test]
fn client_hello_target_survives_random_and_mutated_input() {
    smoke("client_hello", Input::Binary, 20_000, 5_000);
}

#[test]
fn server_flight_target_survives_random_and_mutated_input() {
    smoke("server_flight", Input::Binary, 5_000, 3_000);
}

#[test]
fn payload_target_survives_random_and_mutated_input() {
    smoke("payload", Input::Binary, 2_000, 1_000);
}

#[test]
fn http_head_target_survives_random_and_mutated_input() {
    smoke("http_head", Input::Text, 20_000, 10_000);
}

#[test]
fn signature_file_target_survives_random_and_mutated_input() {
    smoke("signature_file", Input::Text, 5_000, 3_000);
}

#[test]
fn config_target_survives_random_and_mutated_input() {
    smoke("config", Input::Text, 2_000, 1_500);
}

#[test]
fn every_target_has_seeds_and_runs() {
    for target in targets::TARGETS {
        assert!(!seeds_of(target).is_empty(), "no seeds for `{target}`");
        assert!(targets::run(target, b""), "`{target}` is not dispatched");
    }
    assert!(!targets::run("no_such_target", b""));
}

/// Writes the seed corpus to `fuzz/seeds/<target>/<name>`, replacing what
/// is there. Ignored: run it after changing the fixtures or the bundled
/// signature files.
#[test]
#[ignore = "writes fuzz/seeds; run on demand"]
fn write_fuzz_seeds() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = repo.join("fuzz").join("seeds");
    for target in targets::TARGETS {
        let dir = root.join(target);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the seed directory");
    }
    for seed in targets::seeds(repo) {
        let path = root.join(seed.target).join(&seed.name);
        std::fs::write(&path, &seed.bytes).expect("write a seed");
    }
}

/// Captures real server flights from rustls into `tests/fixtures/tls/`: a
/// leaf certificate (`leaf.der`, from rcgen) and the server's answer to one
/// ClientHello in TLS 1.2 (in full-size and in 200-byte records) and in
/// TLS 1.3. Ignored: run it to refresh them, then `write_fuzz_seeds`.
#[test]
#[ignore = "writes tests/fixtures/tls; run on demand"]
fn write_server_flight_fixtures() {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    std::fs::create_dir_all(&dir).expect("create the fixture directory");
    let mut params = rcgen::CertificateParams::new(vec![
        "chat.example.com".to_string(),
        "*.media.example.com".to_string(),
    ])
    .expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "chat.example.com");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    let der = cert.der().to_vec();
    std::fs::write(dir.join("leaf.der"), &der).expect("write the leaf");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let flight = |versions: &[&'static rustls::SupportedProtocolVersion],
                  fragment: Option<usize>| {
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(der.clone())],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        server.max_fragment_size = fragment;
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = "chat.example.com".try_into().expect("server name");
        let mut client = rustls::ClientConnection::new(Arc::new(client), name).expect("client");
        let mut server = rustls::ServerConnection::new(Arc::new(server)).expect("server");
        let mut hello = Vec::new();
        while client.write_tls(&mut hello).expect("write") > 0 {}
        let mut rest = &hello[..];
        while !rest.is_empty() {
            server.read_tls(&mut rest).expect("read");
            server.process_new_packets().expect("hello accepted");
        }
        let mut out = Vec::new();
        while server.write_tls(&mut out).expect("write") > 0 {}
        out
    };
    for (name, versions, fragment) in [
        ("rustls-tls12", &[&rustls::version::TLS12][..], None),
        (
            "rustls-tls12-small-records",
            &[&rustls::version::TLS12][..],
            Some(200),
        ),
        ("rustls-tls13", &[&rustls::version::TLS13][..], None),
    ] {
        std::fs::write(dir.join(format!("{name}.bin")), flight(versions, fragment))
            .expect("write a flight");
    }
}
