//! Bounded polling: the only way a test waits for something to happen.
//!
//! A test never sleeps a guessed amount of time; it states the condition it
//! needs, how long that may take at most, and what it is waiting for, so a
//! timeout fails with a sentence instead of a hang or a flaky assertion.

use std::time::{Duration, Instant};

/// Polls `condition` every `poll_interval` until it returns `true`; panics
/// naming `description` if that has not happened within `timeout`. The
/// condition is always checked at least once, and once more at the deadline.
pub fn wait_until(
    timeout: Duration,
    poll_interval: Duration,
    description: &str,
    mut condition: impl FnMut() -> bool,
) {
    wait_for(timeout, poll_interval, description, || {
        condition().then_some(())
    });
}

/// Like [`wait_until`], for a condition that yields a value once it holds:
/// polls `probe` until it returns `Some`, and returns that value.
pub fn wait_for<T>(
    timeout: Duration,
    poll_interval: Duration,
    description: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        let now = Instant::now();
        if now >= deadline {
            // One last look: the condition may have become true while the
            // previous poll was running.
            if let Some(value) = probe() {
                return value;
            }
            panic!(
                "timed out after {:.1}s waiting until {description}",
                started.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(poll_interval.min(deadline - now));
    }
}
