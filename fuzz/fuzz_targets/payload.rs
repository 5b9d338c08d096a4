//! Fuzz target `payload`: the first bytes of a tunnel: the payload matcher's
//! hold/forward contract on a sample rule set, and the bundled set's
//! automaton in both directions.
//!
//! The logic is `chatwall_fuzz::payload` in `fuzz/src/lib.rs`, which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run from the crate
//! root (see fuzz/README.md):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run payload fuzz/corpus/payload fuzz/seeds/payload
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::payload(data));
