//! The rules against hand-computed expectations: every kept backup and
//! every rule that keeps it is written out below, worked out from the
//! calendar by hand, not by a second implementation.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, SecondsFormat, TimeDelta, Utc};

use super::*;
use crate::schedules::timing::parse_timezone;

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .with_timezone(&Utc)
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Backups with the times given, in that order, each with its position
/// as id.
fn listed(times: &[&str]) -> Vec<Candidate<usize>> {
    times
        .iter()
        .enumerate()
        .map(|(id, time)| Candidate { id, time: at(time) })
        .collect()
}

/// One case: `backups` under `policy` in `zone` at `now` keep exactly
/// `kept` (newest first: time, then every rule that keeps it); every
/// other backup is removed.
struct Case<'a> {
    name: &'a str,
    policy: Policy,
    zone: &'a str,
    now: &'a str,
    backups: Vec<Candidate<usize>>,
    kept: &'a [(&'a str, &'a [&'a str])],
}

fn check(case: Case) {
    let zone = parse_timezone(case.zone).unwrap();
    let decisions = decide(&case.policy, &case.backups, zone, at(case.now))
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    assert_eq!(decisions.len(), case.backups.len(), "{}", case.name);
    let times: Vec<_> = decisions.iter().map(|d| d.time).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "{}: decisions are newest first", case.name);

    let kept: Vec<(String, Vec<String>)> = decisions
        .iter()
        .filter(|d| d.fate == Fate::Keep)
        .map(|d| {
            (
                rfc3339(d.time),
                d.reasons.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    let expected: Vec<(String, Vec<String>)> = case
        .kept
        .iter()
        .map(|(time, reasons)| {
            (
                time.to_string(),
                reasons.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(kept, expected, "{}", case.name);
    for removed in decisions.iter().filter(|d| d.fate == Fate::Remove) {
        assert!(removed.reasons.is_empty(), "{}: {removed:?}", case.name);
    }

    // The input order never matters: the same backups listed backwards
    // get the same decisions.
    let mut backwards = case.backups.clone();
    backwards.reverse();
    let again = decide(&case.policy, &backwards, zone, at(case.now)).unwrap();
    assert_eq!(again, decisions, "{}: listed backwards", case.name);
}

/// 2025-01-01 to 2025-12-31, one backup a day at 03:00 UTC.
fn a_year_of_dailies() -> Vec<Candidate<usize>> {
    let first = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
    (0..365)
        .map(|day| Candidate {
            id: day,
            time: (first + TimeDelta::days(day as i64))
                .and_hms_opt(3, 0, 0)
                .unwrap()
                .and_utc(),
        })
        .collect()
}

#[test]
fn a_year_of_daily_backups_keeps_seven_days_four_weeks_twelve_months_and_the_year() {
    let backups = a_year_of_dailies();
    assert_eq!(rfc3339(backups[364].time), "2025-12-31T03:00:00Z");
    // By hand:
    // - daily 7: the last seven days, Dec 25 to 31.
    // - weekly 4: 2025-12-31 is a Wednesday; its ISO week began Monday
    //   Dec 29 and holds 2026-01-01 (a Thursday), so it is 2026-W01. The
    //   newest backups of the three weeks before end on the Sundays
    //   Dec 28 (2025-W52), Dec 21 (W51) and Dec 14 (W50).
    // - monthly 12: the last day of each month of 2025; the count runs out
    //   at January 31.
    // - yearly 2: 2025 is the only year with backups, so one count is left
    //   when the walk reaches the oldest backup, January 1, which restic
    //   keeps as the "oldest yearly".
    check(Case {
        name: "a year of dailies",
        policy: Policy {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            keep_yearly: Some(2),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-01-01T00:00:00Z",
        backups,
        kept: &[
            (
                "2025-12-31T03:00:00Z",
                &[
                    "daily 2025-12-31",
                    "weekly 2026-W01",
                    "monthly 2025-12",
                    "yearly 2025",
                ],
            ),
            ("2025-12-30T03:00:00Z", &["daily 2025-12-30"]),
            ("2025-12-29T03:00:00Z", &["daily 2025-12-29"]),
            (
                "2025-12-28T03:00:00Z",
                &["daily 2025-12-28", "weekly 2025-W52"],
            ),
            ("2025-12-27T03:00:00Z", &["daily 2025-12-27"]),
            ("2025-12-26T03:00:00Z", &["daily 2025-12-26"]),
            ("2025-12-25T03:00:00Z", &["daily 2025-12-25"]),
            ("2025-12-21T03:00:00Z", &["weekly 2025-W51"]),
            ("2025-12-14T03:00:00Z", &["weekly 2025-W50"]),
            ("2025-11-30T03:00:00Z", &["monthly 2025-11"]),
            ("2025-10-31T03:00:00Z", &["monthly 2025-10"]),
            ("2025-09-30T03:00:00Z", &["monthly 2025-09"]),
            ("2025-08-31T03:00:00Z", &["monthly 2025-08"]),
            ("2025-07-31T03:00:00Z", &["monthly 2025-07"]),
            ("2025-06-30T03:00:00Z", &["monthly 2025-06"]),
            ("2025-05-31T03:00:00Z", &["monthly 2025-05"]),
            ("2025-04-30T03:00:00Z", &["monthly 2025-04"]),
            ("2025-03-31T03:00:00Z", &["monthly 2025-03"]),
            ("2025-02-28T03:00:00Z", &["monthly 2025-02"]),
            ("2025-01-31T03:00:00Z", &["monthly 2025-01"]),
            ("2025-01-01T03:00:00Z", &["oldest yearly 2025"]),
        ],
    });
}

#[test]
fn a_year_of_dailies_with_keep_last_and_keep_within() {
    // keep-last 3: Dec 29 to 31. keep-within 5d of Dec 31 03:00: after
    // Dec 26 03:00, so Dec 27 to 31 (Dec 26 itself is exactly 5 days
    // older: not within, as in restic). The counts of keep-last run out
    // before the oldest backup, so it keeps no oldest.
    check(Case {
        name: "keep-last and keep-within",
        policy: Policy {
            keep_last: Some(3),
            keep_within: Some(Duration::from_secs(5 * 86_400)),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-06-01T00:00:00Z",
        backups: a_year_of_dailies(),
        kept: &[
            ("2025-12-31T03:00:00Z", &["last 1", "within 5d"]),
            ("2025-12-30T03:00:00Z", &["last 2", "within 5d"]),
            ("2025-12-29T03:00:00Z", &["last 3", "within 5d"]),
            ("2025-12-28T03:00:00Z", &["within 5d"]),
            ("2025-12-27T03:00:00Z", &["within 5d"]),
        ],
    });
}

/// Gaps of several days, three backups on one day and two on another, and
/// a clock set back: the third line is dated before the first two.
const IRREGULAR: [&str; 6] = [
    "2026-03-01T10:00:00Z",
    "2026-03-01T22:00:00Z",
    "2026-03-01T04:00:00Z",
    "2026-03-05T03:00:00Z",
    "2026-03-09T03:00:00Z",
    "2026-03-09T12:00:00Z",
];

#[test]
fn irregular_backups_count_only_days_that_have_backups() {
    // Three days have backups (Mar 1, 5, 9); daily 3 keeps the newest of
    // each, however far apart: Mar 9 12:00, Mar 5, Mar 1 22:00.
    check(Case {
        name: "gaps and several a day",
        policy: Policy {
            keep_daily: Some(3),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-03-10T00:00:00Z",
        backups: listed(&IRREGULAR),
        kept: &[
            ("2026-03-09T12:00:00Z", &["daily 2026-03-09"]),
            ("2026-03-05T03:00:00Z", &["daily 2026-03-05"]),
            ("2026-03-01T22:00:00Z", &["daily 2026-03-01"]),
        ],
    });
    // Daily 4 has a count left at the oldest backup (Mar 1 04:00, listed
    // third): kept as the oldest; Mar 1 10:00 still goes.
    check(Case {
        name: "a count left at the oldest",
        policy: Policy {
            keep_daily: Some(4),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-03-10T00:00:00Z",
        backups: listed(&IRREGULAR),
        kept: &[
            ("2026-03-09T12:00:00Z", &["daily 2026-03-09"]),
            ("2026-03-05T03:00:00Z", &["daily 2026-03-05"]),
            ("2026-03-01T22:00:00Z", &["daily 2026-03-01"]),
            ("2026-03-01T04:00:00Z", &["oldest daily 2026-03-01"]),
        ],
    });
    // Hourly 3: one hour each; keep-last 2 adds the same two newest.
    check(Case {
        name: "hourly",
        policy: Policy {
            keep_last: Some(2),
            keep_hourly: Some(3),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-03-10T00:00:00Z",
        backups: listed(&IRREGULAR),
        kept: &[
            ("2026-03-09T12:00:00Z", &["last 1", "hourly 2026-03-09T12h"]),
            ("2026-03-09T03:00:00Z", &["last 2", "hourly 2026-03-09T03h"]),
            ("2026-03-05T03:00:00Z", &["hourly 2026-03-05T03h"]),
        ],
    });
}

#[test]
fn a_backup_dated_after_now_is_never_removed() {
    // now is Mar 10. The June backup is in the future: kept for that
    // alone, and, as in restic, it is also the newest for keep-last.
    // keep-within counts from the newest backup not in the future (Mar 9
    // 03:00): after Mar 8 03:00, so Mar 8 03:00 itself is not within.
    check(Case {
        name: "future",
        policy: Policy {
            keep_last: Some(1),
            keep_within: Some(Duration::from_secs(86_400)),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-03-10T00:00:00Z",
        backups: listed(&[
            "2026-03-08T03:00:00Z",
            "2026-06-01T03:00:00Z",
            "2026-03-09T03:00:00Z",
            "2026-03-08T03:00:01Z",
        ]),
        kept: &[
            (
                "2026-06-01T03:00:00Z",
                &["last 1", "within 1d", "dated after now"],
            ),
            ("2026-03-09T03:00:00Z", &["within 1d"]),
            ("2026-03-08T03:00:01Z", &["within 1d"]),
        ],
    });
}

#[test]
fn keep_within_counts_from_the_newest_backup_not_from_now() {
    // Backups stopped on Jan 10; now is December. Counted from now,
    // keep-within 3d would keep nothing; counted from Jan 10 03:00 it
    // keeps everything after Jan 7 03:00.
    let backups: Vec<String> = (1..=10)
        .map(|day| format!("2026-01-{day:02}T03:00:00Z"))
        .collect();
    let backups: Vec<&str> = backups.iter().map(String::as_str).collect();
    check(Case {
        name: "within from the newest",
        policy: Policy {
            keep_within: Some(Duration::from_secs(3 * 86_400)),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-12-01T00:00:00Z",
        backups: listed(&backups),
        kept: &[
            ("2026-01-10T03:00:00Z", &["within 3d"]),
            ("2026-01-09T03:00:00Z", &["within 3d"]),
            ("2026-01-08T03:00:00Z", &["within 3d"]),
        ],
    });
}

#[test]
fn min_keep_keeps_the_newest_whatever_the_rules_say() {
    // keep-within 1d keeps only Mar 9 12:00 and 03:00 (after Mar 8
    // 12:00); min-keep 4 adds the next two, Mar 5 and Mar 1 22:00.
    check(Case {
        name: "min-keep",
        policy: Policy {
            keep_within: Some(Duration::from_secs(86_400)),
            min_keep: Some(4),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2026-03-10T00:00:00Z",
        backups: listed(&IRREGULAR),
        kept: &[
            ("2026-03-09T12:00:00Z", &["within 1d", "min-keep 1"]),
            ("2026-03-09T03:00:00Z", &["within 1d", "min-keep 2"]),
            ("2026-03-05T03:00:00Z", &["min-keep 3"]),
            ("2026-03-01T22:00:00Z", &["min-keep 4"]),
        ],
    });
}

#[test]
fn days_are_calendar_days_in_the_time_zone() {
    // 2026-03-04 23:30 UTC is 2026-03-05 00:30 in Berlin (CET, UTC+1);
    // 22:00 UTC is still Mar 4 there (23:00).
    let backups = [
        "2026-03-04T22:00:00Z",
        "2026-03-04T23:30:00Z",
        "2026-03-05T10:00:00Z",
    ];
    let daily = Policy {
        keep_daily: Some(2),
        ..Policy::default()
    };
    // In UTC: Mar 5 holds 10:00; Mar 4 holds 23:30 (newest) and 22:00.
    check(Case {
        name: "days in UTC",
        policy: daily.clone(),
        zone: "UTC",
        now: "2026-03-06T00:00:00Z",
        backups: listed(&backups),
        kept: &[
            ("2026-03-05T10:00:00Z", &["daily 2026-03-05"]),
            ("2026-03-04T23:30:00Z", &["daily 2026-03-04"]),
        ],
    });
    // In Berlin: Mar 5 holds 10:00 and 23:30 UTC; Mar 4 only 22:00 UTC.
    check(Case {
        name: "days in Berlin",
        policy: daily,
        zone: "Europe/Berlin",
        now: "2026-03-06T00:00:00Z",
        backups: listed(&backups),
        kept: &[
            ("2026-03-05T10:00:00Z", &["daily 2026-03-05"]),
            ("2026-03-04T22:00:00Z", &["daily 2026-03-04"]),
        ],
    });
}

#[test]
fn weeks_are_iso_weeks_across_the_year_boundary() {
    // 2026 began on a Thursday, so it has 53 ISO weeks: W53 runs from
    // Monday 2026-12-28 to Sunday 2027-01-03 and holds both Dec 31 and
    // Jan 1; Sunday Dec 27 ends W52 and Monday 2027-01-04 begins
    // 2027-W01. Years are calendar years: Jan 1 is 2027.
    check(Case {
        name: "iso weeks",
        policy: Policy {
            keep_weekly: Some(3),
            keep_yearly: Some(1),
            ..Policy::default()
        },
        zone: "UTC",
        now: "2027-02-01T00:00:00Z",
        backups: listed(&[
            "2026-12-27T03:00:00Z",
            "2026-12-31T03:00:00Z",
            "2027-01-01T03:00:00Z",
            "2027-01-04T03:00:00Z",
        ]),
        kept: &[
            ("2027-01-04T03:00:00Z", &["weekly 2027-W01", "yearly 2027"]),
            ("2027-01-01T03:00:00Z", &["weekly 2026-W53"]),
            ("2026-12-27T03:00:00Z", &["weekly 2026-W52"]),
        ],
    });
}

#[test]
fn equal_times_are_ordered_by_id() {
    // Two backups at the same instant: the greater id counts as the
    // newer, whichever is listed first.
    let time = at("2026-03-04T03:00:00Z");
    let backups = vec![
        Candidate {
            id: "b".to_string(),
            time,
        },
        Candidate {
            id: "a".to_string(),
            time,
        },
        Candidate {
            id: "c".to_string(),
            time: time - TimeDelta::hours(1),
        },
    ];
    let policy = Policy {
        keep_last: Some(1),
        keep_daily: Some(1),
        ..Policy::default()
    };
    let zone = parse_timezone("UTC").unwrap();
    let now = at("2026-03-05T00:00:00Z");
    let forwards = decide(&policy, &backups, zone, now).unwrap();
    let mut reversed = backups.clone();
    reversed.reverse();
    assert_eq!(decide(&policy, &reversed, zone, now).unwrap(), forwards);
    let fates: Vec<(&str, Fate)> = forwards.iter().map(|d| (d.id.as_str(), d.fate)).collect();
    assert_eq!(
        fates,
        [("b", Fate::Keep), ("a", Fate::Remove), ("c", Fate::Remove)]
    );
}

#[test]
fn an_invalid_policy_decides_nothing() {
    let error = decide(
        &Policy::default(),
        &listed(&IRREGULAR),
        parse_timezone("UTC").unwrap(),
        at("2026-03-10T00:00:00Z"),
    )
    .unwrap_err();
    assert!(error.to_string().contains("at least one rule"), "{error}");
    let decisions = decide(
        &Policy {
            keep_last: Some(1),
            ..Policy::default()
        },
        &[] as &[Candidate<usize>],
        parse_timezone("UTC").unwrap(),
        at("2026-03-10T00:00:00Z"),
    )
    .unwrap();
    assert!(decisions.is_empty());
}
