//! Code shared by the coordinator (`cairn`) and the agent (`cairn-agent`):
//! the generated protocol, validated names, the identity carried by a client
//! certificate, mutual-TLS plumbing, enrollment tokens, configuration loading
//! and the probe model.
//!
//! The wire stays at the edge: only [`proto`] and the conversions in
//! [`model`] see prost types.

pub mod archive;
pub mod chunk;
pub mod config;
pub mod crypto;
pub mod error;
pub mod identity;
pub mod model;
pub mod names;
pub mod pki;
pub mod proto;
pub mod tls;
pub mod token;

pub use error::Error;

/// The version of this build, sent by agents at registration.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
