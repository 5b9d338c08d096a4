//! chatwall: a forward and transparent HTTP/HTTPS proxy that keeps
//! instant-messaging applications off a network and lets every other flow
//! pass untouched.
//!
//! # Layout
//!
//! ```text
//! config ──► engine (config + signatures + policy, swapped whole on reload)
//!
//! proxy::listener ─► front end ─► decide ─► Verdict / Refusal
//!   connect + explicit (first head, absolute-form HTTP, CONNECT)
//!   transparent (original destination)      │
//!   tunnel (first bytes; HTTP/1.x followed   ├─► refuse (403 page / reset)
//!           request by request, byte-exact)  └─► upstream + relay
//!                                                └─► access_log, metrics
//! ```
//!
//! `classify` (names, addresses, bytes), `decide` (what the policy makes of
//! them) and `policy` are pure: they import nothing from `proxy`, so the
//! command line (`classify`, `classify pcap`), the benches, the fuzz targets
//! and the tests run exactly the code the proxy runs.
//!
//! `update` (`chatwall signatures update`) fetches a signed bundle,
//! validates it as `check-config` does, swaps it into `[signatures] dir`
//! and asks the running proxy to reload through its admin listener.
//!
//! `tls_inspect` holds TLS inspection's local CA (`chatwall ca init|show`)
//! and mints the leaf certificates a decrypted flow presents to its client,
//! cached and bounded; it opens no sockets.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod classify;
pub mod cli;
pub mod config;
pub mod decide;
pub mod directory;
pub mod engine;
pub mod export;
pub mod metrics;
pub mod negotiate;
pub mod pac;
pub mod policy;
pub mod proxy;
pub mod replay;
pub mod schedule;
pub mod server;
pub mod signatures;
pub mod tls_inspect;
pub mod update;
