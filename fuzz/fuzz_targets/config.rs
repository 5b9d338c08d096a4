//! Fuzz target `config`: a configuration file: `Config::load`, then resolving
//! its policy against the bundled set.
//!
//! The logic is `chatwall_fuzz::config` in `fuzz/src/lib.rs`, which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run from the crate
//! root (see fuzz/README.md):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run config fuzz/corpus/config fuzz/seeds/config
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::config(data));
