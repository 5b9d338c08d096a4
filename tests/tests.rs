//! Integration tests: one binary, real sockets on loopback.
mod support;

mod cli;
mod explicit;
mod inspect;
mod ops;
mod transparent;
