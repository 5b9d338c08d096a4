//! chatwall: a forward and transparent HTTP/HTTPS proxy that keeps
//! instant-messaging applications off a network and lets every other flow
//! pass untouched.
//!
//! # Layout
//!
//! ```text
//! config ──► engine (config + signatures + policy, swapped whole on reload)
//!
//! proxy::listener ─► front end ─► Evidence ─► classify ─► policy ─► Verdict
//!   explicit (absolute-form HTTP, CONNECT)       │                    │
//!   transparent (original destination)          │      refuse (403 / reset)
//!   tunnel (first bytes: TLS, HTTP, payload)     │      or upstream + relay
//!                                                └─► access_log, metrics
//! ```
//!
//! `classify`, `policy` and `signatures` are pure: they import nothing from
//! `proxy`, so the command line (`classify`, `classify pcap`) and the tests
//! run exactly the code the proxy runs.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod classify;
pub mod cli;
pub mod config;
pub mod decide;
pub mod engine;
pub mod export;
pub mod metrics;
pub mod pac;
pub mod policy;
pub mod proxy;
pub mod replay;
pub mod server;
pub mod signatures;
