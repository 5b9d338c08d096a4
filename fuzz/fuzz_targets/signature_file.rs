//! Fuzz target `signature_file`: The text of one signature file: loading, compiling, and the compiled set finding its own names.
//!
//! The logic is `chatwall_fuzz::signature_file` (fuzz/src/lib.rs), which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run signature_file fuzz/corpus/signature_file fuzz/seeds/signature_file`
//! (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::signature_file(data));
