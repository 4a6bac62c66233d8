//! The Cairn coordinator: the `cairn serve` server (catalog, fleet CA,
//! agent control streams, Admin API, audit, health and metrics) and the
//! operator command line (`cli`). `main.rs` only parses arguments and calls
//! in here, so tests drive the same code.

pub mod admin;
pub mod audit;
pub mod audit_log;
pub mod auth;
pub mod authority;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod download;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod home;
pub mod http;
pub mod jobs;
pub mod keys;
pub mod manifest;
pub mod rebuild;
pub mod refusals;
pub mod repository;
pub mod repository_check;
pub mod repository_init;
pub mod restores;
pub mod server;
pub mod unauthenticated;
pub mod upload;
pub mod verify;
pub mod wire;

pub use error::{CoordinatorError, Result};
