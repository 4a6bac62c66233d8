//! The Cairn agent: runs on each database host as the user that owns the
//! PostgreSQL data directory. Enrolls once (`enroll`), then keeps one
//! control stream to the coordinator (`control`) and executes what its own
//! config permits (`dispatch`). Only `postgres` talks to PostgreSQL.

pub mod backup;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod dump;
pub mod enroll;
pub mod error;
pub mod jobs;
pub mod postgres;
pub mod renew;
pub mod restore;
pub mod resume;
pub mod spool;
pub mod upload;

pub use error::{AgentError, Result};
