//! Refusals audited without letting a flood write the audit log.
//!
//! Anyone who can reach the gRPC port can be refused: a TLS handshake with
//! a foreign certificate, a call without a certificate, an enrollment with a
//! made-up token. Each refusal belongs in the audit log, but one row per
//! attempt would let an anonymous client grow the disk and slow every
//! legitimate append (each row is hash-chained behind one writer). So
//! refusals are counted per client network (an IPv4 address, an IPv6
//! /64), action and reason, in windows of
//! `interval`: the first refusal of a window is recorded as it happened, the
//! rest are counted into one summary row when the window closes ("refused
//! 2,311 more times in 60 s"). Nothing is lost: the counts of open windows
//! are written at shutdown too.
//!
//! Recording never blocks the caller and spawns nothing per refusal: rows go
//! through a bounded queue to one writer task. A full queue (an audit log
//! slower than the flood) drops the row and counts it, and the writer
//! reports the count in a row of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::log::AuditLog;
use crate::audit::{AuditEvent, Outcome};

/// Rows waiting for the writer.
const QUEUE_LEN: usize = 256;
/// Windows remembered at once; past that, new peers share one window per
/// action and reason, so memory stays bounded whatever the addresses.
const WINDOWS_MAX: usize = 4096;

/// One kind of refusal from one peer address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WindowKey {
    /// `None`: the shared window of peers beyond `WINDOWS_MAX`.
    peer: Option<IpAddr>,
    action: &'static str,
    reason: &'static str,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Refusals after the first, not yet written.
    counted: u64,
    /// The first refusal's row, the model for the summary.
    first: AuditEvent,
}

/// The handle every refusing component holds; cheap to clone.
#[derive(Clone)]
pub struct RefusalAudit {
    windows: Arc<Mutex<HashMap<WindowKey, Window>>>,
    sender: mpsc::Sender<AuditEvent>,
    dropped: Arc<AtomicU64>,
    interval: Duration,
}

impl std::fmt::Debug for RefusalAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalAudit")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// The client network of a peer as `peer_of` or a socket address prints
/// it (`1.2.3.4:5678`, `[::1]:5678`): its IPv4 address or IPv6 /64, so a
/// client rotating addresses within its /64 counts as one; `None` if it
/// has no address.
fn peer_ip(peer: &str) -> Option<IpAddr> {
    peer.parse::<std::net::SocketAddr>()
        .map(|address| address.ip())
        .or_else(|_| peer.parse::<IpAddr>())
        .ok()
        .map(cairn_common::tls::client_network)
}

/// `2311` as `2,311`.
fn with_thousands(count: u64) -> String {
    let digits = count.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The summary row of a window that counted refusals after its first.
fn summary(window: &Window, now: Instant) -> AuditEvent {
    let seconds = now.duration_since(window.started).as_secs().max(1);
    let mut event = window.first.clone();
    event.detail = format!(
        "refused {} more times in {seconds} s: {}",
        with_thousands(window.counted),
        window.first.detail
    );
    event
}

impl RefusalAudit {
    /// Starts the writer task (tracked by `tasks`, ended by `shutdown` after
    /// it has written every open window's count).
    pub fn start(
        audit: AuditLog,
        interval: Duration,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> RefusalAudit {
        let (sender, receiver) = mpsc::channel(QUEUE_LEN);
        let refusals = RefusalAudit {
            windows: Arc::new(Mutex::new(HashMap::new())),
            sender,
            dropped: Arc::new(AtomicU64::new(0)),
            interval,
        };
        tasks.spawn(refusals.clone().write(audit, receiver, shutdown));
        refusals
    }

    /// Records a refusal: `reason` is a fixed phrase naming its kind (the
    /// counting key, with the peer's address and `event.action`); the
    /// event's detail says what happened this time.
    pub fn refuse(&self, peer: &str, reason: &'static str, event: AuditEvent) {
        debug_assert!(event.outcome == Outcome::Refused);
        let now = Instant::now();
        let mut key = WindowKey {
            peer: peer_ip(peer),
            action: event.action,
            reason,
        };
        let mut to_write = Vec::new();
        {
            let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            if !windows.contains_key(&key) && windows.len() >= WINDOWS_MAX {
                to_write.extend(close_expired(&mut windows, now, self.interval));
                if windows.len() >= WINDOWS_MAX {
                    key.peer = None;
                }
            }
            match windows.get_mut(&key) {
                Some(window) if now.duration_since(window.started) < self.interval => {
                    window.counted += 1;
                }
                _ => {
                    if let Some(old) = windows.remove(&key)
                        && old.counted > 0
                    {
                        to_write.push(summary(&old, now));
                    }
                    let mut first = event;
                    if key.peer.is_none() {
                        first.actor = "peers (many addresses)".to_string();
                    }
                    windows.insert(
                        key,
                        Window {
                            started: now,
                            counted: 0,
                            first: first.clone(),
                        },
                    );
                    to_write.push(first);
                }
            }
        }
        for row in to_write {
            if self.sender.try_send(row).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Summaries of windows that have closed (all of them with `everything`),
    /// removed from the map.
    fn take_summaries(&self, everything: bool) -> Vec<AuditEvent> {
        let now = Instant::now();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if everything {
            windows
                .drain()
                .filter(|(_, window)| window.counted > 0)
                .map(|(_, window)| summary(&window, now))
                .collect()
        } else {
            close_expired(&mut windows, now, self.interval)
        }
    }

    /// The one writer: queued rows in order, closed windows' summaries
    /// every quarter interval, and everything at shutdown.
    async fn write(
        self,
        audit: AuditLog,
        mut receiver: mpsc::Receiver<AuditEvent>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval((self.interval / 4).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = receiver.recv() => match event {
                    Some(event) => audit.record(event).await,
                    None => break,
                },
                _ = tick.tick() => {
                    for event in self.take_summaries(false) {
                        audit.record(event).await;
                    }
                    self.report_dropped(&audit).await;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        while let Ok(event) = receiver.try_recv() {
            audit.record(event).await;
        }
        for event in self.take_summaries(true) {
            audit.record(event).await;
        }
        self.report_dropped(&audit).await;
    }

    async fn report_dropped(&self, audit: &AuditLog) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "refusal audit rows dropped: the queue was full");
            audit
                .record(AuditEvent::new(
                    "coordinator",
                    "audit.refusals-dropped",
                    "coordinator",
                    Outcome::Failed,
                    format!(
                        "{} refusal rows were not written: they came faster than the audit log could take them",
                        with_thousands(dropped)
                    ),
                ))
                .await;
        }
    }
}

/// Removes the windows older than `interval`; the summaries of those that
/// counted refusals.
fn close_expired(
    windows: &mut HashMap<WindowKey, Window>,
    now: Instant,
    interval: Duration,
) -> Vec<AuditEvent> {
    let mut summaries = Vec::new();
    windows.retain(|_, window| {
        if now.duration_since(window.started) < interval {
            return true;
        }
        if window.counted > 0 {
            summaries.push(summary(window, now));
        }
        false
    });
    summaries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        for (count, expected) in [
            (0, "0"),
            (7, "7"),
            (999, "999"),
            (1000, "1,000"),
            (2311, "2,311"),
            (1234567, "1,234,567"),
        ] {
            assert_eq!(with_thousands(count), expected, "{count}");
        }
    }

    #[test]
    fn peer_addresses_lose_their_port() {
        for (peer, expected) in [
            ("127.0.0.9:5000", Some("127.0.0.9")),
            ("[::1]:443", Some("::")),
            ("[2001:db8:1:2:3:4:5:6]:443", Some("2001:db8:1:2::")),
            ("10.1.2.3", Some("10.1.2.3")),
            ("unknown", None),
        ] {
            assert_eq!(
                peer_ip(peer),
                expected.map(|ip| ip.parse().unwrap()),
                "{peer}"
            );
        }
    }
}
