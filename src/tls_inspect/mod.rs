//! TLS inspection's certificate authority: the operator's local CA
//! (`ca`: load and check it, or make a new one for `chatwall ca init`) and
//! the leaf certificates minted under it for the names a decrypted flow
//! needs (`mint`: one fresh ECDSA P-256 key per leaf, a bounded cache with
//! coalesced minting).
//!
//! What it leaves to others: deciding which flows are decrypted, the TLS
//! handshakes on either side, and the upstream certificate whose names and
//! fingerprint a leaf mirrors (the caller passes them in). No sockets here.
//!
//! The CA key signs certificates only, never a TLS handshake.

pub mod ca;
pub mod mint;

pub use ca::{Authority, NewCa};
pub use mint::{CacheResult, Minter};
pub mod interception;
