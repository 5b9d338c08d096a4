//! Integration tests: one binary, real sockets on loopback.
mod support;

mod admin;
mod browser;
mod cert_names;
mod circumvention;
mod cli;
mod deploy;
mod directory;
mod downloads;
mod explicit;
mod export_cli;
mod forward;
mod fuzz_smoke;
mod hardening;
mod inspect;
#[cfg(feature = "negotiate")]
mod kerberos;
mod ops;
mod parent;
mod passthrough;
mod schedules;
mod tls_ca;
mod tls_inspect;
mod transparent;
mod updates;
