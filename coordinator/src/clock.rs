//! Wall-clock time as stored in the catalog: milliseconds since the epoch.
//!
//! The job engine and schedules read time only through a [`Clock`], so a
//! test can set it: [`Clock::manual`] starts at a chosen instant and moves
//! only when the test advances it. (Not tokio's paused time: the catalog's
//! connection pool times its waits on tokio's clock, and paused time jumps
//! past those timeouts while SQLite works on its own thread.)

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// A test's clock: moves only by [`Clock::advance`].
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A clock that reads `start_ms` until advanced.
    pub fn manual(start_ms: i64) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    /// Moves a manual clock on (the system clock moves by itself).
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(now) = self {
            let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX / 4);
            now.fetch_add(by, Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(now) => now.load(Ordering::SeqCst),
        }
    }
}
