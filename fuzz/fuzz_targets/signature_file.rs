//! Fuzz target `signature_file`: the text of one signature file: loading and
//! compiling it, and the compiled set finding its own host names.
//!
//! The logic is `chatwall_fuzz::signature_file` in `fuzz/src/lib.rs`, which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run from the crate
//! root (see fuzz/README.md):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run signature_file fuzz/corpus/signature_file fuzz/seeds/signature_file
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::signature_file(data));
