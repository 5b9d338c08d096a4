//! Fuzz target `http_head`: an HTTP/1.x request head, parsed with httparse, and
//! the start of its body, through the bundled set's HTTP, host and download
//! rules.
//!
//! The logic is `chatwall_fuzz::http_head` in `fuzz/src/lib.rs`, which
//! `tests/fuzz_smoke.rs` also runs under `cargo test`. Run from the crate
//! root (see fuzz/README.md):
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run http_head fuzz/corpus/http_head fuzz/seeds/http_head
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatwall_fuzz::http_head(data));
