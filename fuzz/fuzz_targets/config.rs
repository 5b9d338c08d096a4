//! Fuzz target `config`: A configuration file: Config::load and the policy's resolution against the bundled set.
//!
//! The logic is `chatwall_fuzz::config` (fuzz/src/lib.rs), which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run config fuzz/corpus/config fuzz/seeds/config`
//! (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::config(data));
