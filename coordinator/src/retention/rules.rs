//! Which backups a policy keeps: restic's `forget` rules
//! (`internal/data/snapshot_policy.go`, `ApplyPolicy`), applied to one
//! group of backups (one database lineage) at a time.
//!
//! - The backups are ordered by time, then id, so the input order never
//!   matters and equal times still give one answer (of two backups with
//!   the same time, the greater id counts as the newer).
//! - The rules are ORed: a backup is kept if any rule keeps it, and its
//!   decision names every rule that does.
//! - `keep_last N` keeps the N newest.
//! - `keep_hourly`/`daily`/`weekly`/`monthly`/`yearly N` walk the backups
//!   newest first and keep the newest backup of each of the last N periods
//!   that have backups (a week with no backup does not use up a count).
//!   Periods are calendar periods in the given time zone; weeks are ISO
//!   weeks (ISO year and week: 2027-01-01 is in 2026-W53). If a rule still
//!   has counts left when the walk reaches the oldest backup, the oldest
//!   backup is kept too, so the history reaches back as far as the counts
//!   allow (restic does the same, "oldest daily snapshot").
//! - `keep_within D` keeps every backup less than D older than the newest
//!   backup not dated in the future (not than now): a database whose
//!   backups stopped a month ago still keeps its last D of history.
//! - A backup dated after now is never removed. Like any other it takes a
//!   period of each rule (as in restic), so a backup with a wrong clock can
//!   displace a real one; the catalog dates backups by the coordinator's
//!   clock.
//! - `min_keep N` keeps the N newest whatever the rules say.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::Policy;
use crate::Result;

/// A backup offered to the rules: its id and the time it is dated by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<Id> {
    pub id: Id,
    pub time: DateTime<Utc>,
}

/// Whether a backup stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fate {
    Keep,
    Remove,
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fate::Keep => "keep",
            Fate::Remove => "remove",
        })
    }
}

/// The calendar periods of the period rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    const ALL: [Period; 5] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
    ];

    fn count(self, policy: &Policy) -> Option<u32> {
        match self {
            Period::Hourly => policy.keep_hourly,
            Period::Daily => policy.keep_daily,
            Period::Weekly => policy.keep_weekly,
            Period::Monthly => policy.keep_monthly,
            Period::Yearly => policy.keep_yearly,
        }
    }

    /// The period `time` falls in, read in `zone`, named as people write
    /// it ("2026-03-04T05h", "2026-03-04", "2026-W10", "2026-03", "2026"),
    /// so that equal names are the same period.
    fn of(self, time: DateTime<Utc>, zone: Tz) -> String {
        let local = time.with_timezone(&zone);
        match self {
            Period::Hourly => format!("{}T{:02}h", local.date_naive(), local.hour()),
            Period::Daily => local.date_naive().to_string(),
            Period::Weekly => {
                let week = local.iso_week();
                format!("{}-W{:02}", week.year(), week.week())
            }
            Period::Monthly => format!("{}-{:02}", local.year(), local.month()),
            Period::Yearly => local.year().to_string(),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        })
    }
}

/// A rule that keeps a backup. `Display` is what `simulate` and
/// `--dry-run` print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// `keep_last`: the backup is the `position`th newest (1 = newest).
    Last { position: u32 },
    /// A period rule: the newest backup of `period` ("daily 2026-03-04"),
    /// or, `oldest`, the oldest backup kept because the rule had counts
    /// left ("oldest daily 2026-03-04").
    Period {
        rule: Period,
        period: String,
        oldest: bool,
    },
    /// `keep_within`: younger than this before the newest backup.
    Within { within: Duration },
    /// Dated after now: never removed.
    Future,
    /// `min_keep`: the backup is the `position`th newest.
    MinKeep { position: u32 },
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Last { position } => write!(f, "last {position}"),
            KeepReason::Period {
                rule,
                period,
                oldest,
            } => {
                if *oldest {
                    f.write_str("oldest ")?;
                }
                write!(f, "{rule} {period}")
            }
            KeepReason::Within { within } => write!(
                f,
                "within {}",
                cairn_common::config::display_duration(*within)
            ),
            KeepReason::Future => f.write_str("dated after now"),
            KeepReason::MinKeep { position } => write!(f, "min-keep {position}"),
        }
    }
}

/// What the rules decided for one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<Id> {
    pub id: Id,
    pub time: DateTime<Utc>,
    pub fate: Fate,
    /// Every rule that keeps it, in the policy's order; empty when removed.
    pub reasons: Vec<KeepReason>,
}

/// A period rule walking the backups: counts left, and the period of the
/// last backup it kept.
struct Walk {
    rule: Period,
    left: u32,
    last: Option<String>,
}

/// Decides the fate of each of `backups` (one group: one database
/// lineage; ids unique within it) under `policy`, with calendar periods in `zone` and `now` for
/// what is dated in the future. Returns one decision per backup, newest
/// first. Refuses an invalid policy (see [`Policy::validate`]), so a
/// policy without rules can never remove everything.
pub fn decide<Id: Ord + Clone>(
    policy: &Policy,
    backups: &[Candidate<Id>],
    zone: Tz,
    now: DateTime<Utc>,
) -> Result<Vec<Decision<Id>>> {
    policy.validate()?;
    let mut newest_first: Vec<&Candidate<Id>> = backups.iter().collect();
    newest_first.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));

    // restic's `findLatestTimestamp`: the newest backup not in the future.
    let within_since = policy.keep_within.and_then(|within| {
        let newest = newest_first.iter().find(|b| b.time <= now)?.time;
        // A duration too long for chrono reaches before every backup.
        Some(
            TimeDelta::from_std(within)
                .ok()
                .and_then(|delta| newest.checked_sub_signed(delta)),
        )
    });

    let mut walks: Vec<Walk> = Period::ALL
        .into_iter()
        .filter_map(|rule| {
            rule.count(policy).map(|count| Walk {
                rule,
                left: count,
                last: None,
            })
        })
        .collect();
    let oldest_index = newest_first.len().saturating_sub(1);
    let mut decisions = Vec::with_capacity(newest_first.len());
    for (index, backup) in newest_first.iter().enumerate() {
        let position = u32::try_from(index + 1).unwrap_or(u32::MAX);
        let mut reasons = Vec::new();
        if policy.keep_last.is_some_and(|count| position <= count) {
            reasons.push(KeepReason::Last { position });
        }
        for walk in walks.iter_mut().filter(|walk| walk.left > 0) {
            let period = walk.rule.of(backup.time, zone);
            let new_period = walk.last.as_ref() != Some(&period);
            if new_period || index == oldest_index {
                walk.left -= 1;
                walk.last = Some(period.clone());
                reasons.push(KeepReason::Period {
                    rule: walk.rule,
                    period,
                    oldest: !new_period,
                });
            }
        }
        if let (Some(within), Some(since)) = (policy.keep_within, within_since)
            && since.is_none_or(|since| backup.time > since)
        {
            reasons.push(KeepReason::Within { within });
        }
        if backup.time > now {
            reasons.push(KeepReason::Future);
        }
        if policy.min_keep.is_some_and(|count| position <= count) {
            reasons.push(KeepReason::MinKeep { position });
        }
        decisions.push(Decision {
            id: backup.id.clone(),
            time: backup.time,
            fate: if reasons.is_empty() {
                Fate::Remove
            } else {
                Fate::Keep
            },
            reasons,
        });
    }
    Ok(decisions)
}
