//! Fuzz target `http_head`: An HTTP/1.x request head (and body start) through the bundled set's HTTP, host and download rules.
//!
//! The logic is `chatwall_fuzz::http_head` (fuzz/src/lib.rs), which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run http_head fuzz/corpus/http_head fuzz/seeds/http_head`
//! (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::http_head(data));
