//! Fuzz target `client_hello`: a TLS ClientHello at the start of a tunnel: the
//! parser's invariants on prefixes, and the bundled set's SNI, ALPN and JA4
//! lookup of a complete hello.
//!
//! The logic is `chatwall_fuzz::client_hello` in `fuzz/src/lib.rs`, which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run from the crate
//! root (see fuzz/README.md):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run client_hello fuzz/corpus/client_hello fuzz/seeds/client_hello
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::client_hello(data));
