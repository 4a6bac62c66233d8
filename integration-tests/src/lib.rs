//! Fixtures for whole-system tests of Cairn: real PostgreSQL clusters, the
//! real `cairn` and `cairn-agent` binaries, real processes on loopback.
//!
//! Nothing here is a fake. A test builds the fleet it needs out of these
//! parts, each of which cleans up after itself when dropped:
//!
//! - [`TestDir`]: one directory per test under `/tmp` holding every home,
//!   data directory and `logs/`; kept when the test panics.
//! - [`PgCluster`]: a throwaway PostgreSQL cluster (`initdb` + `pg_ctl`),
//!   optionally a streaming standby of another one.
//! - [`Coordinator`] and [`Agent`]: the real binaries, initialised, served,
//!   enrolled and waited for.
//! - [`S3Server`]: a real S3-protocol server (s3s + s3s-fs) on loopback.
//! - [`Process`], [`run`], [`wait_until`]: the lower-level pieces the above
//!   are made of, for tests that need to cut, pause or kill things.
//!
//! Tests run as root in CI, and PostgreSQL refuses root; every PostgreSQL
//! command and every agent then runs as the `postgres` OS user (see
//! [`privileges`]).
//!
//! Fixture code panics with a message naming what failed and how to fix it:
//! a test that cannot set up its world must fail loudly, never skip.

#![allow(clippy::unwrap_used)]

pub mod bins;
pub mod cluster;
pub mod http;
pub mod net;
pub mod pg;
pub mod privileges;
pub mod process;
pub mod proxy;
pub mod s3;
pub mod testdir;
pub mod wait;

pub use bins::{Binaries, binaries};
pub use cluster::{Agent, AgentOptions, Coordinator, CoordinatorOptions};
pub use net::{LoopbackAddresses, free_port};
pub use pg::{PgCluster, PgClusterBuilder};
pub use process::{Output, Process, ProcessBuilder, run};
pub use s3::S3Server;
pub use testdir::TestDir;
pub use wait::{wait_for, wait_until};

/// Whether a job (as `cairn jobs show --output json` prints it) has not
/// ended: queued or running.
pub fn job_is_active(job: &serde_json::Value) -> bool {
    matches!(job["status"].as_str(), Some("queued" | "running"))
}

/// `text` without the ANSI colour sequences `tracing` writes.
pub fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter.
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The number in field `field` of every line of `log` (a process's log,
/// colours and all) that says `message`: where each "upload resumed"
/// (`next_position`) or "download resumed" (`from_chunk`) went on.
pub fn logged_numbers(log: &str, message: &str, field: &str) -> Vec<u64> {
    let key = format!("{field}=");
    strip_ansi(log)
        .lines()
        .filter(|line| line.contains(message))
        .filter_map(|line| {
            let rest = line.split(key.as_str()).nth(1)?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}
