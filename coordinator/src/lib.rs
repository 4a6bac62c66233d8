//! The Cairn coordinator: the `cairn serve` server (catalog, fleet CA,
//! agent control streams, Admin API, audit, health and metrics) and the
//! operator command line (`cli`). `main.rs` only parses arguments and calls
//! in here, so tests drive the same code.
//!
//! Grouped by what each part owns: `api` (the two gRPC services and what
//! guards them), `audit`, `catalog` (all SQL), `fleet` (agents' sessions
//! and the fleet CA), `jobs` (the job engine and each kind's data path),
//! `repository` (backup storage: layout, keys, manifests, checks),
//! `retention` (which backups a policy keeps), `schedules` (when fleet
//! schedules fire), `server` (the process: startup, home, HTTP).

pub mod api;
pub mod audit;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod error;
pub mod fleet;
pub mod jobs;
pub mod repository;
pub mod retention;
pub mod schedules;
pub mod server;

pub use error::{CoordinatorError, Result};
