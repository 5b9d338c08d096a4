//! Fuzz target `payload`: The first bytes of a tunnel: the payload matcher's hold/forward contract (sample rules) and the bundled automaton.
//!
//! The logic is `chatwall_fuzz::payload` (fuzz/src/lib.rs), which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run payload fuzz/corpus/payload fuzz/seeds/payload`
//! (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::payload(data));
