//! Fuzz target `server_flight`: a TLS server's first bytes: the server
//! flight parser's invariants on prefixes, and the bundled set's lookup of
//! the leaf certificate's names.
//!
//! The logic is `chatwall_fuzz::server_flight` in `fuzz/src/lib.rs`, which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run from the crate
//! root (see fuzz/README.md):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run server_flight fuzz/corpus/server_flight fuzz/seeds/server_flight
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::server_flight(data));
