//! Wall-clock time as stored in the catalog: milliseconds since the epoch.
//!
//! The job engine and schedules read time only through a [`Clock`], so a
//! test can run them on tokio's paused time: [`Clock::paused_from`] counts
//! from a chosen instant as tokio's clock advances.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// `base_ms` plus the time tokio's clock advanced since `start`.
    Paused {
        base_ms: i64,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `base_ms` now and advances with tokio's time
    /// (paused in tests).
    pub fn paused_from(base_ms: i64) -> Clock {
        Clock::Paused {
            base_ms,
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => now_ms(),
            Clock::Paused { base_ms, start } => {
                base_ms + i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX / 2)
            }
        }
    }
}
