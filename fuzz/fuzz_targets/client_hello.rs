//! Fuzz target `client_hello`: A TLS ClientHello at the start of a tunnel: the parser's prefix invariants and the bundled set's SNI/ALPN/JA4 lookup.
//!
//! The logic is `chatwall_fuzz::client_hello` (fuzz/src/lib.rs), which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run client_hello fuzz/corpus/client_hello fuzz/seeds/client_hello`
//! (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::client_hello(data));
