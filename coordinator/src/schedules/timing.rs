//! When a schedule fires: its cron expression read in its IANA time zone,
//! the stable start offset that spreads one fire over a fleet, and which
//! fires are due (or were missed) since the schedule was last evaluated.
//! Pure functions of their arguments: no clock, no catalog.
//!
//! # Cron
//!
//! Five fields, `minute hour day-of-month month day-of-week`, parsed by
//! `croner` (the `@daily`-style nicknames too). A sixth field (seconds) or
//! seventh (years) is refused: a backup schedule finer than a minute is a
//! mistake, and a year field would let a schedule silently stop firing.
//! When both day fields are restricted, a day matching either one fires,
//! as in classic cron.
//!
//! # Daylight saving time
//!
//! Fires are wall-clock times in the schedule's zone. Where the zone's
//! offset changes, they follow ISC cron 4.1 (Vixie cron; `cron.c`, the
//! `timeRunning`/`virtualTime` loop of `main` and `find_jobs(vtime, db,
//! doWild, doNonWild)`, `entry.c` `load_entry`; github.com/vixie/cron,
//! read at 9cc8ab1, the rule unchanged since bd04834 "handle clock
//! jumps", 2003). That cron tells two kinds of job apart:
//! - a *wildcard* job has a minute or an hour field whose first character
//!   is `*` (the `MIN_STAR` and `HR_STAR` flags), or is `@hourly`:
//!   `0 * * * *`, `*/5 * * * *`, `15 * * * *`, `* 2 * * *`,
//!   `30 */2 * * *`;
//! - every other job is *fixed-time*, lists and ranges included:
//!   `30 2 * * *`, `0,30 2 * * *`, `0 1-5 * * *`, `0-59 2 * * *`,
//!   `@daily`.
//!
//! It then sorts the step its wall clock takes at a change (`timeDiff`,
//! in minutes: one when nothing happened, so a skip of N minutes is N + 1
//! and a repeat of N is 1 - N) into four cases:
//! - a skip of 5 to 179 minutes (DST begins, "medium"): wildcard jobs run
//!   on the real clock, so a wildcard time in the skipped span does not
//!   fire at all, while every fixed-time time in it fires at the jump (the
//!   first instant after the gap): `30 2 * * *` in Europe/Berlin on
//!   2026-03-29 fires at 03:00 CEST, `15 * * * *` fires at 01:15 CET and
//!   next at 03:15 CEST, and `*/5` has no burst at the jump;
//! - a repeat of up to 181 minutes (DST ends, "negative"): the first pass
//!   runs every job, the second pass only wildcard jobs, so a fixed-time
//!   time in the repeated span fires once, at its first occurrence, and a
//!   wildcard one at both: `30 2 * * *` on 2026-10-25 fires at 02:30 CEST
//!   only, `0 * * * *` at 02:00 CEST and again at 02:00 CET, an hour
//!   later;
//! - a skip of under 5 minutes ("small", a late wake-up to cron): every
//!   time in it fires at the jump;
//! - a skip of 180 minutes or more, or a repeat of 182 or more ("large",
//!   taken for a clock set by hand): nothing in a skipped span fires, and
//!   a repeated span fires twice, for every job.
//!
//! Where ISC cron would start a job once for each of several times that
//! land on the same jump (`0,30 2 * * *`, or `0 2-3 * * *`, whose 03:00
//! CEST is the jump too), a fire here is an instant, so they are one fire.
//!
//! `croner` searches here in naive wall-clock time, where no time is
//! skipped or repeated, and [`CronSchedule`] maps each match to its
//! instants by the rule above itself (`croner` 4 searching in a
//! `DateTime<Tz>` has a rule of its own, by its own notion of a fixed
//! time).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, SubsecRound, TimeDelta,
    TimeZone, Utc,
};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use crate::{CoordinatorError, Result};

/// How late an evaluation tick may come and still run a fire when the
/// schedule allows no catch-up: a tick that is a few seconds late (a busy
/// coordinator, a slow catalog) must not turn the fire it was due for into
/// a missed one.
pub const LATE_TICK_GRACE: Duration = Duration::from_secs(60);

/// At most this many missed fires are listed by [`due_fires`] (the newest
/// ones); the rest are only counted, so a coordinator that was down for a
/// year does not record half a million rows for a minutely schedule.
pub const MISSED_CAP: usize = 100;

/// The longest spring-forward gap searched for its end: a day, the most
/// any zone has skipped.
const GAP_MINUTES_MAX: i64 = 24 * 60 + 1;

/// ISC cron's bounds on its wall clock's step, `timeDiff` in `cron.c`, as
/// the minutes a change skips or repeats: a skip of fewer minutes than
/// this is "small" (every job catches up at the jump)...
const SMALL_SKIP_MINUTES: i64 = 5;
/// ...a skip of at least this many is "large" (`timeDiff > 3*MINUTE_COUNT`:
/// nothing skipped fires)...
const LARGE_SKIP_MINUTES: i64 = 180;
/// ...and so is a repeat of at least this many (`timeDiff <
/// -(3*MINUTE_COUNT)`: every job fires on both passes).
const LARGE_REPEAT_MINUTES: i64 = 182;

/// Schedules already parsed, by expression and time zone as given (see
/// [`CronSchedule::parse`]).
static PARSED: LazyLock<Mutex<HashMap<(String, String), CronSchedule>>> =
    LazyLock::new(Mutex::default);

/// At most this many pairs are kept in [`PARSED`].
const PARSED_MAX: usize = 4096;

/// How many fires [`CronSchedule::interval_hint`] looks at.
const INTERVAL_HINT_FIRES: usize = 10;

/// Years from 1970 in which every date falls on every weekday (see
/// [`matches_a_date`]).
const CALENDAR_CYCLE_YEARS: i32 = 28;

const CRON_FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];

const CRON_FORM: &str =
    "use 5 fields: minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\"";

/// Reads an IANA time zone name as given to `--timezone` (schedules,
/// `cairn retention simulate`); the error names the flag and the fix.
pub fn parse_timezone(timezone: &str) -> Result<Tz> {
    Tz::from_str(timezone).map_err(|_| {
        CoordinatorError::InvalidArgument(format!(
            "--timezone {timezone:?}: not an IANA time zone; \
             use a name like Europe/Berlin or UTC"
        ))
    })
}

/// A parsed cron expression in an IANA time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Cron,
    zone: Tz,
    /// ISC cron's wildcard job (see the module doc): its times run on the
    /// real clock at a DST change.
    wildcard: bool,
    expression: String,
    timezone: String,
}

impl CronSchedule {
    /// Parses a 5-field cron expression (`--cron`) and an IANA time zone
    /// name (`--timezone`). Errors name the flag and the fix. An
    /// expression that matches no date at all (`0 0 30 2 *`) is refused.
    ///
    /// The engine parses every schedule at every evaluation tick, and
    /// `croner`'s parse costs far more than a lookup (hundreds of
    /// microseconds unoptimised), so a valid pair is parsed once per
    /// process and then cloned from [`PARSED`]. Errors are not kept: they
    /// come only from `schedule create`, not from the tick.
    pub fn parse(expression: &str, timezone: &str) -> Result<Self> {
        let key = (expression.to_string(), timezone.to_string());
        let cached = PARSED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(schedule) = cached {
            return Ok(schedule);
        }
        let schedule = Self::parse_uncached(expression, timezone)?;
        let mut parsed = PARSED.lock().unwrap_or_else(PoisonError::into_inner);
        if parsed.len() >= PARSED_MAX {
            // More pairs than a fleet has schedules: start over rather
            // than grow without bound.
            parsed.clear();
        }
        parsed.insert(key, schedule.clone());
        Ok(schedule)
    }

    fn parse_uncached(expression: &str, timezone: &str) -> Result<Self> {
        #[cfg(test)]
        tests::UNCACHED_PARSES.with(|count| count.set(count.get() + 1));
        let zone = parse_timezone(timezone)?;
        let fields = expression.split_whitespace().count();
        let nickname = expression.trim_start().starts_with('@');
        if !nickname && fields != 5 {
            let found = match fields {
                0 => "empty".to_string(),
                6 | 7 => format!(
                    "{fields} fields, but seconds and years are not supported \
                     (a backup schedule finer than a minute is a mistake)"
                ),
                _ => format!("{fields} fields"),
            };
            return Err(CoordinatorError::InvalidArgument(format!(
                "--cron {expression:?}: {found}; {CRON_FORM}"
            )));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(expression).map_err(|error| {
            // croner's message does not say which field is wrong: find it
            // by parsing each field with the others left at `*`.
            if nickname {
                return CoordinatorError::InvalidArgument(format!(
                    "--cron {expression:?}: not a nickname cron knows; use @yearly, \
                     @monthly, @weekly, @daily or @hourly, or {}",
                    CRON_FORM.trim_start_matches("use ")
                ));
            }
            let fields: Vec<&str> = expression.split_whitespace().collect();
            let wrong_field = (0..fields.len()).find_map(|index| {
                let alone: Vec<&str> = (0..fields.len())
                    .map(|other| if other == index { fields[index] } else { "*" })
                    .collect();
                let error = parser.parse(&alone.join(" ")).err()?;
                Some(format!(
                    "the {} field {:?} is invalid ({})",
                    CRON_FIELDS.get(index).unwrap_or(&"?"),
                    fields[index],
                    error.to_string().trim_end_matches('.')
                ))
            });
            let found =
                wrong_field.unwrap_or_else(|| error.to_string().trim_end_matches('.').to_string());
            CoordinatorError::InvalidArgument(format!(
                "--cron {expression:?}: {found}; {CRON_FORM}"
            ))
        })?;
        if !matches_a_date(&cron) {
            return Err(CoordinatorError::InvalidArgument(format!(
                "--cron {expression:?}: matches no date; check the day-of-month, month \
                 and day-of-week fields"
            )));
        }
        Ok(CronSchedule {
            cron,
            zone,
            wildcard: is_wildcard(expression),
            expression: expression.to_string(),
            timezone: timezone.to_string(),
        })
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The time zone name as given.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// Fire instants strictly after `after` and at or before `until`, in
    /// order, at most `limit`. Costs one `croner` search per fire (no
    /// minute-by-minute scan), so a wide window is cheap when `limit` is
    /// small.
    pub fn fires_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        self.fires_after(after)
            .take_while(|fire| *fire <= until)
            .take(limit)
            .collect()
    }

    /// The next `n` fire instants strictly after `after`.
    pub fn next_fires(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        self.fires_after(after).take(n).collect()
    }

    /// The shortest gap between consecutive fires among the next few after
    /// `after`, measured on the wall clock: the schedule's nominal interval,
    /// which a DST change does not shrink (a daily fire is a day apart even
    /// across a 23-hour day). `Duration::MAX` if fewer than two fires are
    /// left before the year 5000, where `croner` stops searching.
    pub fn interval_hint(&self, after: DateTime<Utc>) -> Duration {
        let Ok(mut previous) = self
            .cron
            .find_next_occurrence(&self.wall_clock(after), false)
        else {
            return Duration::MAX;
        };
        let mut shortest: Option<TimeDelta> = None;
        for _ in 1..INTERVAL_HINT_FIRES {
            let Ok(next) = self.cron.find_next_occurrence(&previous, false) else {
                break;
            };
            let gap = next - previous;
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            previous = next;
        }
        shortest
            .and_then(|gap| gap.to_std().ok())
            .unwrap_or(Duration::MAX)
    }

    /// Fire instants strictly after `after`, in order, without repeats.
    fn fires_after(&self, after: DateTime<Utc>) -> Fires<'_> {
        let wall = self.wall_clock(after);
        // Starting in the first pass of a repeated span whose times fire
        // on the second pass too, that second pass is still ahead, even if
        // no time of the first pass is.
        let pass = match self.zone.from_local_datetime(&wall) {
            LocalResult::Ambiguous(first, second) => self
                .repeat_of(first.with_timezone(&Utc), second.with_timezone(&Utc))
                .filter(|repeat| repeat.fires_twice && after < repeat.change)
                .map_or(Pass::Normal, |repeat| Pass::First {
                    start: repeat.start,
                    end: repeat.end,
                }),
            _ => Pass::Normal,
        };
        Fires {
            schedule: self,
            after,
            wall,
            pass,
            last: None,
        }
    }

    /// `instant` on this schedule's wall clock, to the second below
    /// (`croner` searches whole seconds).
    fn wall_clock(&self, instant: DateTime<Utc>) -> NaiveDateTime {
        instant
            .with_timezone(&self.zone)
            .naive_local()
            .trunc_subsecs(0)
    }

    /// The zone's offset from UTC at `instant`, in seconds.
    fn offset_seconds(&self, instant: DateTime<Utc>) -> i64 {
        i64::from(
            self.zone
                .offset_from_utc_datetime(&instant.naive_utc())
                .fix()
                .local_minus_utc(),
        )
    }

    /// The span of wall-clock time repeated by the change between the two
    /// instants of one repeated wall-clock time, and whether this
    /// schedule's times in it fire on both passes (ISC cron: a wildcard
    /// job, or any job when the repeat is large). `None` if the offsets
    /// do not say a clock went back (not for any real zone).
    fn repeat_of(&self, first: DateTime<Utc>, second: DateTime<Utc>) -> Option<Repeat> {
        let before = self.offset_seconds(first);
        let after = self.offset_seconds(second);
        let repeated = before - after;
        if repeated <= 0 {
            return None;
        }
        // The change is in (first, second]; find its second.
        let (mut old, mut new) = (first, second);
        while new - old > TimeDelta::seconds(1) {
            let middle = old + (new - old) / 2;
            if self.offset_seconds(middle) == before {
                old = middle;
            } else {
                new = middle;
            }
        }
        let start = self.wall_clock(new);
        Some(Repeat {
            change: new,
            start,
            end: start + TimeDelta::seconds(repeated),
            fires_twice: self.wildcard || repeated / 60 >= LARGE_REPEAT_MINUTES,
        })
    }

    /// Where a wall-clock time skipped by a change fires: at the jump, or
    /// (`None`) not at all, by ISC cron's rule; and the wall-clock time the
    /// search for the next fire continues after, just before the gap's
    /// end, so a fire at the end itself is still found (and merged with
    /// the jump). `None` also for a gap longer than any zone has.
    fn skipped(&self, in_gap: NaiveDateTime) -> Option<(Option<DateTime<Utc>>, NaiveDateTime)> {
        let (gap_end, jump) = self.end_of_gap(in_gap)?;
        let skipped_minutes =
            (self.offset_seconds(jump) - self.offset_seconds(jump - TimeDelta::seconds(1))) / 60;
        let fires = if skipped_minutes < SMALL_SKIP_MINUTES {
            true
        } else if skipped_minutes < LARGE_SKIP_MINUTES {
            !self.wildcard
        } else {
            false
        };
        Some((fires.then_some(jump), gap_end - TimeDelta::seconds(1)))
    }

    /// For a wall-clock time in a spring-forward gap: the first wall-clock
    /// time after the gap, and its instant (the jump). Gaps are at most a
    /// day (Pacific/Apia skipped 2011-12-30), so this steps through at most
    /// a day of minutes, then back to the second; it runs only at a DST
    /// change.
    fn end_of_gap(&self, in_gap: NaiveDateTime) -> Option<(NaiveDateTime, DateTime<Utc>)> {
        let resolve = |wall: NaiveDateTime| match self.zone.from_local_datetime(&wall) {
            LocalResult::Single(instant) | LocalResult::Ambiguous(instant, _) => Some(instant),
            LocalResult::None => None,
        };
        let mut still_in_gap = in_gap;
        let (mut end, mut jump) = (1..=GAP_MINUTES_MAX).find_map(|minutes| {
            let wall = in_gap + TimeDelta::minutes(minutes);
            match resolve(wall) {
                Some(instant) => Some((wall, instant)),
                None => {
                    still_in_gap = wall;
                    None
                }
            }
        })?;
        // The gap ends within the last minute stepped over; find its second.
        while end - TimeDelta::seconds(1) > still_in_gap {
            let Some(earlier) = resolve(end - TimeDelta::seconds(1)) else {
                break;
            };
            end -= TimeDelta::seconds(1);
            jump = earlier;
        }
        Some((end, jump.with_timezone(&Utc)))
    }
}

/// Whether an expression is ISC cron's wildcard job: its minute or hour
/// field begins with `*` (`entry.c` sets `MIN_STAR`/`HR_STAR` from the
/// field's first character, before parsing it), or it is `@hourly` (which
/// sets `HR_STAR`); the other nicknames are fixed-time.
fn is_wildcard(expression: &str) -> bool {
    let mut fields = expression.split_whitespace();
    match fields.next() {
        Some(nickname) if nickname.starts_with('@') => nickname.eq_ignore_ascii_case("@hourly"),
        Some(minute) => {
            minute.starts_with('*') || fields.next().is_some_and(|hour| hour.starts_with('*'))
        }
        None => false,
    }
}

/// Whether a pattern matches any date. Without a year field a pattern that
/// matches no date in 28 years matches none ever, like the 30th of
/// February: from 1970 on, 28 years hold every date on every weekday, leap
/// days included (2000 is a leap year, so no century year breaks the
/// cycle). Checked here because a search for the next fire of such a
/// pattern only gives up in the year 5000. Months the pattern excludes are
/// passed over whole, so `0 0 30 2 *` costs 28 Februaries, and an ordinary
/// pattern stops at its first matching day.
fn matches_a_date(cron: &Cron) -> bool {
    for year in 1970..1970 + CALENDAR_CYCLE_YEARS {
        for month in 1..=12 {
            if !cron.pattern.month_match(month).unwrap_or(false) {
                continue;
            }
            let Some(first) = NaiveDate::from_ymd_opt(year, month, 1) else {
                continue;
            };
            let mut weekday = first.weekday().num_days_from_sunday();
            for date in first.iter_days().take_while(|date| date.month() == month) {
                let matches = cron
                    .pattern
                    .day_match(
                        year,
                        month,
                        date.day(),
                        croner::Weekday::from_days_from_sunday(weekday),
                    )
                    .unwrap_or(false);
                if matches {
                    return true;
                }
                weekday = (weekday + 1) % 7;
            }
        }
    }
    false
}

/// A span of wall-clock time that a change of offset repeats.
struct Repeat {
    /// The change: the first instant of the second pass.
    change: DateTime<Utc>,
    /// The span, `[start, end)` in wall-clock time.
    start: NaiveDateTime,
    end: NaiveDateTime,
    /// Whether this schedule's times in the span fire on the second pass.
    fires_twice: bool,
}

/// A stable start offset in `[0, spread)` for one target of one schedule,
/// so a fleet-wide 03:00 is spread over the window instead of starting
/// every backup at once, and each target's slot is the same every day.
/// BLAKE3 (in its key-derivation mode, so the hash is Cairn's own) of the
/// schedule id and the target key, each length-prefixed so no two pairs
/// give the same bytes, scaled to the spread in milliseconds, the
/// catalog's unit. A zero spread gives zero.
pub fn spread_offset(schedule_id: &str, target_key: &str, spread: Duration) -> Duration {
    let spread_ms = u64::try_from(spread.as_millis()).unwrap_or(u64::MAX);
    if spread_ms == 0 {
        return Duration::ZERO;
    }
    let mut hasher = blake3::Hasher::new_derive_key("cairn schedule spread offset v1");
    for part in [schedule_id, target_key] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let mut first_eight = [0u8; 8];
    first_eight.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    let uniform = u64::from_le_bytes(first_eight);
    // `uniform / 2^64` is in [0, 1); the product fits in 128 bits.
    let offset_ms = (u128::from(uniform) * u128::from(spread_ms)) >> 64;
    Duration::from_millis(u64::try_from(offset_ms).unwrap_or(u64::MAX))
}

/// What to do with a schedule's fires since it was last evaluated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueFires {
    /// Fires to run now, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// Fires too old to run, oldest first: at most [`MISSED_CAP`], the
    /// newest ones.
    pub missed: Vec<DateTime<Utc>>,
    /// Missed fires older than those in `missed`, only counted.
    pub missed_beyond_cap: u64,
}

/// Sorts the fires in `(last_evaluated, now]` into those to run and those
/// missed. A fire runs if it is at most `catch_up` before `now`, or at
/// most [`LATE_TICK_GRACE`] before it, whichever is longer (so a schedule
/// without catch-up still runs the fire a late tick was due for); older
/// fires are missed. Calling this with consecutive windows (each
/// `last_evaluated` the previous `now`) sees every fire exactly once. A
/// `now` at or before `last_evaluated` (a clock set back) has no fires.
///
/// `run` holds every fire in the window: with a catch-up window several
/// intervals long, the caller may want only the newest of them.
///
/// Every missed fire is visited to count it, one `croner` search each:
/// after a long outage of a minutely schedule this is a few hundred
/// thousand searches, once.
pub fn due_fires(
    schedule: &CronSchedule,
    last_evaluated: DateTime<Utc>,
    now: DateTime<Utc>,
    catch_up: Duration,
) -> DueFires {
    let run_window = catch_up.max(LATE_TICK_GRACE);
    let run_from = TimeDelta::from_std(run_window)
        .ok()
        .and_then(|window| now.checked_sub_signed(window))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut due = DueFires::default();
    let mut missed = std::collections::VecDeque::with_capacity(MISSED_CAP);
    for fire in schedule.fires_after(last_evaluated) {
        if fire > now {
            break;
        }
        if fire >= run_from {
            due.run.push(fire);
        } else {
            if missed.len() == MISSED_CAP {
                missed.pop_front();
                due.missed_beyond_cap += 1;
            }
            missed.push_back(fire);
        }
    }
    due.missed = missed.into();
    due
}

/// Where a [`Fires`] search is relative to a repeated span whose times
/// fire on both passes.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// Not in such a span: each wall-clock time is its (first) instant.
    Normal,
    /// In the first pass of `[start, end)`: when the search leaves it, it
    /// goes back to `start` for the second pass.
    First {
        start: NaiveDateTime,
        end: NaiveDateTime,
    },
    /// In the second pass: times before `end` are their second instant.
    Second { end: NaiveDateTime },
}

/// Fire instants after a starting instant, in order, without repeats (a
/// gap's fire times share one instant). Wall-clock order is instant order
/// except in a repeated span, whose first pass is all earlier than its
/// second: such a span is searched twice.
struct Fires<'a> {
    schedule: &'a CronSchedule,
    /// Only fires strictly after this are yielded.
    after: DateTime<Utc>,
    /// The search continues strictly after this wall-clock time.
    wall: NaiveDateTime,
    pass: Pass,
    last: Option<DateTime<Utc>>,
}

impl Iterator for Fires<'_> {
    type Item = DateTime<Utc>;

    fn next(&mut self) -> Option<DateTime<Utc>> {
        let schedule = self.schedule;
        loop {
            // An error means no match before the year 5000.
            let found = schedule.cron.find_next_occurrence(&self.wall, false).ok();
            if let Pass::First { start, end } = self.pass
                && found.is_none_or(|wall| wall >= end)
            {
                self.pass = Pass::Second { end };
                self.wall = start - TimeDelta::seconds(1);
                continue;
            }
            let wall = found?;
            let instant = match (self.pass, schedule.zone.from_local_datetime(&wall)) {
                (Pass::Second { end }, LocalResult::Ambiguous(_, second)) if wall < end => {
                    self.wall = wall;
                    second.with_timezone(&Utc)
                }
                (_, LocalResult::Single(instant)) => {
                    self.pass = Pass::Normal;
                    self.wall = wall;
                    instant.with_timezone(&Utc)
                }
                (_, LocalResult::Ambiguous(first, second)) => {
                    let first = first.with_timezone(&Utc);
                    self.wall = wall;
                    self.pass = match schedule.repeat_of(first, second.with_timezone(&Utc)) {
                        Some(repeat) if repeat.fires_twice => Pass::First {
                            start: repeat.start,
                            end: repeat.end,
                        },
                        _ => Pass::Normal,
                    };
                    first
                }
                (_, LocalResult::None) => {
                    self.pass = Pass::Normal;
                    let Some((jump, resume)) = schedule.skipped(wall) else {
                        self.wall = wall;
                        continue;
                    };
                    // The rest of the gap fires at the same jump, or not
                    // at all: the search goes on from its end.
                    self.wall = resume;
                    let Some(jump) = jump else {
                        continue;
                    };
                    jump
                }
            };
            // Instants never go backwards in this order, so what is
            // skipped here is a gap's fire already yielded or a time at or
            // before the start (in a repeated span, a pass the start is
            // past).
            if instant <= self.after || Some(instant) == self.last {
                continue;
            }
            self.last = Some(instant);
            return Some(instant);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Parses on this thread that missed [`PARSED`].
        pub(super) static UNCACHED_PARSES: Cell<u64> = const { Cell::new(0) };
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
            .with_timezone(&Utc)
    }

    fn ats(list: &[&str]) -> Vec<DateTime<Utc>> {
        list.iter().map(|s| at(s)).collect()
    }

    fn schedule(expression: &str, timezone: &str) -> CronSchedule {
        CronSchedule::parse(expression, timezone)
            .unwrap_or_else(|e| panic!("{expression} in {timezone}: {e}"))
    }

    /// One case: the fires of `expression` in `timezone` in `(after, until]`.
    struct Case {
        expression: &'static str,
        timezone: &'static str,
        after: &'static str,
        until: &'static str,
        fires: &'static [&'static str],
    }

    fn check(cases: &[Case]) {
        for case in cases {
            let schedule = schedule(case.expression, case.timezone);
            let got = schedule.fires_between(at(case.after), at(case.until), 1000);
            assert_eq!(
                got,
                ats(case.fires),
                "{} in {} after {}",
                case.expression,
                case.timezone,
                case.after
            );
        }
    }

    // Europe/Berlin in 2026: 2026-03-29 02:00 CET (01:00Z) jumps to 03:00
    // CEST; 2026-10-25 03:00 CEST (01:00Z) goes back to 02:00 CET.
    // America/New_York in 2026: 2026-03-08 02:00 EST (07:00Z) jumps to
    // 03:00 EDT; 2026-11-01 02:00 EDT (06:00Z) goes back to 01:00 EST.

    #[test]
    fn wildcard_jobs_are_told_apart_by_the_first_character_of_minute_and_hour() {
        for (expression, wildcard) in [
            ("0 * * * *", true),
            ("*/5 * * * *", true),
            ("15 * * * *", true),
            ("* 2 * * *", true),
            ("30 */2 * * *", true),
            ("* * * * *", true),
            ("@hourly", true),
            ("@HOURLY", true),
            ("30 2 * * *", false),
            ("0,30 2 * * *", false),
            ("0 1-5 * * *", false),
            // Every minute, but ISC cron looks at the first character.
            ("0-59 2 * * *", false),
            ("0 3 * * *", false),
            ("@daily", false),
            ("@weekly", false),
            ("@yearly", false),
        ] {
            assert_eq!(
                schedule(expression, "UTC").wildcard,
                wildcard,
                "{expression}"
            );
        }
    }

    #[test]
    fn a_fixed_time_fire_in_the_skipped_hour_runs_at_the_jump() {
        check(&[
            Case {
                expression: "30 2 * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-27T12:00:00Z",
                until: "2026-03-31T12:00:00Z",
                // 02:30 CET, then 02:30 does not exist: 03:00 CEST, then
                // 02:30 CEST.
                fires: &[
                    "2026-03-28T01:30:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-30T00:30:00Z",
                    "2026-03-31T00:30:00Z",
                ],
            },
            Case {
                expression: "0 3 * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-27T12:00:00Z",
                until: "2026-03-30T12:00:00Z",
                fires: &[
                    "2026-03-28T02:00:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-30T01:00:00Z",
                ],
            },
            Case {
                // A list is fixed-time: 02:00 and 02:30 both run at the
                // jump, one fire.
                expression: "0,30 2 * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-28T12:00:00Z",
                until: "2026-03-30T12:00:00Z",
                fires: &[
                    "2026-03-29T01:00:00Z",
                    "2026-03-30T00:00:00Z",
                    "2026-03-30T00:30:00Z",
                ],
            },
            Case {
                // So is a range: 02:30 runs at the jump, 03:30 CEST half
                // an hour later.
                expression: "30 2-3 * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-28T12:00:00Z",
                until: "2026-03-29T12:00:00Z",
                fires: &["2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"],
            },
            Case {
                expression: "30 2 * * *",
                timezone: "America/New_York",
                after: "2026-03-06T12:00:00Z",
                until: "2026-03-09T12:00:00Z",
                fires: &[
                    "2026-03-07T07:30:00Z",
                    "2026-03-08T07:00:00Z",
                    "2026-03-09T06:30:00Z",
                ],
            },
        ]);
    }

    #[test]
    fn a_wildcard_fire_in_the_skipped_hour_does_not_run() {
        check(&[
            Case {
                // 01:00 CET, 03:00 CEST, 04:00 CEST: every real hour.
                expression: "0 * * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-28T23:30:00Z",
                until: "2026-03-29T02:30:00Z",
                fires: &[
                    "2026-03-29T00:00:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-29T02:00:00Z",
                ],
            },
            Case {
                // 01:30 CET, then 03:00 CEST: no burst at the jump.
                expression: "*/30 * * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-28T23:45:00Z",
                until: "2026-03-29T01:45:00Z",
                fires: &[
                    "2026-03-29T00:00:00Z",
                    "2026-03-29T00:30:00Z",
                    "2026-03-29T01:00:00Z",
                    "2026-03-29T01:30:00Z",
                ],
            },
            Case {
                // 01:15 CET, then 03:15 CEST: 02:15 does not exist and
                // does not run.
                expression: "15 * * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-28T23:30:00Z",
                until: "2026-03-29T02:30:00Z",
                fires: &[
                    "2026-03-29T00:15:00Z",
                    "2026-03-29T01:15:00Z",
                    "2026-03-29T02:15:00Z",
                ],
            },
            Case {
                // A `*` minute makes a wildcard job: no fire that day.
                expression: "* 2 * * *",
                timezone: "Europe/Berlin",
                after: "2026-03-28T23:00:00Z",
                until: "2026-03-30T00:00:30Z",
                fires: &["2026-03-30T00:00:00Z"],
            },
            Case {
                expression: "@hourly",
                timezone: "Europe/Berlin",
                after: "2026-03-29T00:30:00Z",
                until: "2026-03-29T02:00:00Z",
                fires: &["2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"],
            },
            Case {
                // 01:15 EST, then 03:15 EDT.
                expression: "15 * * * *",
                timezone: "America/New_York",
                after: "2026-03-08T06:00:00Z",
                until: "2026-03-08T08:00:00Z",
                fires: &["2026-03-08T06:15:00Z", "2026-03-08T07:15:00Z"],
            },
        ]);
    }

    #[test]
    fn a_fixed_time_fire_in_the_repeated_hour_runs_once_at_its_first_occurrence() {
        check(&[
            Case {
                expression: "30 2 * * *",
                timezone: "Europe/Berlin",
                after: "2026-10-23T12:00:00Z",
                until: "2026-10-26T12:00:00Z",
                // 02:30 CEST; on the 25th 02:30 CEST (00:30Z) and not
                // 02:30 CET (01:30Z); then 02:30 CET.
                fires: &[
                    "2026-10-24T00:30:00Z",
                    "2026-10-25T00:30:00Z",
                    "2026-10-26T01:30:00Z",
                ],
            },
            Case {
                expression: "0 3 * * *",
                timezone: "Europe/Berlin",
                after: "2026-10-23T12:00:00Z",
                until: "2026-10-26T12:00:00Z",
                fires: &[
                    "2026-10-24T01:00:00Z",
                    "2026-10-25T02:00:00Z",
                    "2026-10-26T02:00:00Z",
                ],
            },
            Case {
                expression: "0,30 2 * * *",
                timezone: "Europe/Berlin",
                after: "2026-10-24T12:00:00Z",
                until: "2026-10-25T12:00:00Z",
                fires: &["2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z"],
            },
            Case {
                // 01:30 runs at 01:30 EDT only.
                expression: "30 1 * * *",
                timezone: "America/New_York",
                after: "2026-10-31T00:00:00Z",
                until: "2026-11-02T12:00:00Z",
                fires: &[
                    "2026-10-31T05:30:00Z",
                    "2026-11-01T05:30:00Z",
                    "2026-11-02T06:30:00Z",
                ],
            },
        ]);
    }

    #[test]
    fn a_wildcard_fire_in_the_repeated_hour_runs_on_both_passes() {
        check(&[
            Case {
                // 01:00 CEST, 02:00 CEST, 02:00 CET, 03:00 CET: every real
                // hour.
                expression: "0 * * * *",
                timezone: "Europe/Berlin",
                after: "2026-10-24T22:30:00Z",
                until: "2026-10-25T02:30:00Z",
                fires: &[
                    "2026-10-24T23:00:00Z",
                    "2026-10-25T00:00:00Z",
                    "2026-10-25T01:00:00Z",
                    "2026-10-25T02:00:00Z",
                ],
            },
            Case {
                expression: "*/30 * * * *",
                timezone: "Europe/Berlin",
                after: "2026-10-24T23:45:00Z",
                until: "2026-10-25T02:45:00Z",
                fires: &[
                    "2026-10-25T00:00:00Z",
                    "2026-10-25T00:30:00Z",
                    "2026-10-25T01:00:00Z",
                    "2026-10-25T01:30:00Z",
                    "2026-10-25T02:00:00Z",
                    "2026-10-25T02:30:00Z",
                ],
            },
            Case {
                // 02:15 CEST, 02:15 CET, 03:15 CET.
                expression: "15 * * * *",
                timezone: "Europe/Berlin",
                after: "2026-10-24T23:30:00Z",
                until: "2026-10-25T02:30:00Z",
                fires: &[
                    "2026-10-25T00:15:00Z",
                    "2026-10-25T01:15:00Z",
                    "2026-10-25T02:15:00Z",
                ],
            },
            Case {
                // 01:00 EDT, 01:00 EST, 02:00 EST.
                expression: "0 * * * *",
                timezone: "America/New_York",
                after: "2026-11-01T04:30:00Z",
                until: "2026-11-01T07:30:00Z",
                fires: &[
                    "2026-11-01T05:00:00Z",
                    "2026-11-01T06:00:00Z",
                    "2026-11-01T07:00:00Z",
                ],
            },
        ]);
        // Every minute of the repeated hour, on both passes.
        let both_passes = schedule("* 2 * * *", "Europe/Berlin").fires_between(
            at("2026-10-24T12:00:00Z"),
            at("2026-10-25T12:00:00Z"),
            1000,
        );
        assert_eq!(both_passes.len(), 120);
        assert_eq!(both_passes.first(), Some(&at("2026-10-25T00:00:00Z")));
        assert_eq!(both_passes.last(), Some(&at("2026-10-25T01:59:00Z")));
        assert!(both_passes.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn a_skip_of_under_five_minutes_fires_every_job_at_the_jump() {
        // Asia/Yerevan left local mean time (+02:58) for +03:00 at the
        // start of 1924-05-02: 00:00 and 00:01 were skipped. To ISC cron
        // that is a late wake-up, so even a wildcard job catches up.
        check(&[
            Case {
                expression: "0 * * * *",
                timezone: "Asia/Yerevan",
                after: "1924-05-01T20:30:00Z",
                until: "1924-05-01T22:00:00Z",
                fires: &["1924-05-01T21:02:00Z", "1924-05-01T22:00:00Z"],
            },
            Case {
                expression: "0 0 * * *",
                timezone: "Asia/Yerevan",
                after: "1924-05-01T20:30:00Z",
                until: "1924-05-01T22:00:00Z",
                fires: &["1924-05-01T21:02:00Z"],
            },
        ]);
    }

    #[test]
    fn a_change_of_three_hours_or_more_is_a_clock_set_by_hand() {
        check(&[
            Case {
                // Pacific/Apia skipped all of 2011-12-30 (UTC-10 to
                // UTC+14): a large skip, so that day's noon does not run,
                // though the job is fixed-time.
                expression: "0 12 * * *",
                timezone: "Pacific/Apia",
                after: "2011-12-29T12:00:00Z",
                until: "2011-12-31T12:00:00Z",
                fires: &["2011-12-29T22:00:00Z", "2011-12-30T22:00:00Z"],
            },
            Case {
                // America/Sitka went from Russian to American time on
                // 1867-10-19 at 15:30 local mean time (+14:58:47 to
                // -09:01:13): a day repeated, so even a fixed-time job
                // runs on both passes.
                expression: "0 12 * * *",
                timezone: "America/Sitka",
                after: "1867-10-17T00:00:00Z",
                until: "1867-10-21T00:00:00Z",
                fires: &[
                    "1867-10-17T21:01:13Z",
                    "1867-10-18T21:01:13Z",
                    "1867-10-19T21:01:13Z",
                    "1867-10-20T21:01:13Z",
                ],
            },
        ]);
    }

    #[test]
    fn utc_schedules_and_the_window_bounds() {
        check(&[
            Case {
                // `after` is exclusive, `until` inclusive.
                expression: "0 3 * * *",
                timezone: "UTC",
                after: "2026-03-28T03:00:00Z",
                until: "2026-03-30T03:00:00Z",
                fires: &["2026-03-29T03:00:00Z", "2026-03-30T03:00:00Z"],
            },
            Case {
                // No DST in UTC: the Berlin change days are ordinary.
                expression: "*/30 * * * *",
                timezone: "UTC",
                after: "2026-03-29T00:45:00Z",
                until: "2026-03-29T02:00:00Z",
                fires: &[
                    "2026-03-29T01:00:00Z",
                    "2026-03-29T01:30:00Z",
                    "2026-03-29T02:00:00Z",
                ],
            },
            Case {
                // Sub-second starts: a fire a moment before `after` is out,
                // one a moment after it is in.
                expression: "0 3 * * *",
                timezone: "UTC",
                after: "2026-03-28T02:59:59.999Z",
                until: "2026-03-28T12:00:00Z",
                fires: &["2026-03-28T03:00:00Z"],
            },
            Case {
                expression: "0 3 * * *",
                timezone: "UTC",
                after: "2026-03-28T03:00:00.001Z",
                until: "2026-03-29T12:00:00Z",
                fires: &["2026-03-29T03:00:00Z"],
            },
            Case {
                // Both day fields restricted: either matches (classic cron).
                expression: "0 0 1 * MON",
                timezone: "UTC",
                after: "2026-05-30T00:00:00Z",
                until: "2026-06-09T00:00:00Z",
                fires: &["2026-06-01T00:00:00Z", "2026-06-08T00:00:00Z"],
            },
            Case {
                expression: "@daily",
                timezone: "UTC",
                after: "2026-01-01T00:00:00Z",
                until: "2026-01-02T00:00:00Z",
                fires: &["2026-01-02T00:00:00Z"],
            },
            Case {
                expression: "0 3 * * *",
                timezone: "UTC",
                after: "2026-01-02T00:00:00Z",
                until: "2026-01-01T00:00:00Z",
                fires: &[],
            },
        ]);
    }

    #[test]
    fn fires_between_stops_at_the_limit() {
        let minutely = schedule("* * * * *", "UTC");
        let after = at("2026-01-01T00:00:00Z");
        let until = at("2027-01-01T00:00:00Z");
        assert_eq!(
            minutely.fires_between(after, until, 3),
            ats(&[
                "2026-01-01T00:01:00Z",
                "2026-01-01T00:02:00Z",
                "2026-01-01T00:03:00Z"
            ])
        );
        assert!(minutely.fires_between(after, until, 0).is_empty());
    }

    #[test]
    fn next_fires_start_strictly_after_any_instant() {
        for (expression, timezone, after, fires) in [
            (
                "0 3 * * *",
                "Europe/Berlin",
                "2026-03-28T12:00:00Z",
                &[
                    "2026-03-29T01:00:00Z",
                    "2026-03-30T01:00:00Z",
                    "2026-03-31T01:00:00Z",
                ],
            ),
            // From the jump itself: not the jump again.
            (
                "*/30 * * * *",
                "Europe/Berlin",
                "2026-03-29T01:00:00Z",
                &[
                    "2026-03-29T01:30:00Z",
                    "2026-03-29T02:00:00Z",
                    "2026-03-29T02:30:00Z",
                ],
            ),
            // From just before the jump: the skipped 02:15 does not run.
            (
                "15 * * * *",
                "Europe/Berlin",
                "2026-03-29T00:59:00Z",
                &[
                    "2026-03-29T01:15:00Z",
                    "2026-03-29T02:15:00Z",
                    "2026-03-29T03:15:00Z",
                ],
            ),
            // From 02:10 CEST, the first pass of the repeated hour, with no
            // fire left in it: the second pass is still ahead.
            (
                "0 * * * *",
                "Europe/Berlin",
                "2026-10-25T00:10:00Z",
                &[
                    "2026-10-25T01:00:00Z",
                    "2026-10-25T02:00:00Z",
                    "2026-10-25T03:00:00Z",
                ],
            ),
            // From 02:10 CET, the second pass: its earlier times are past.
            (
                "*/30 * * * *",
                "Europe/Berlin",
                "2026-10-25T01:10:00Z",
                &[
                    "2026-10-25T01:30:00Z",
                    "2026-10-25T02:00:00Z",
                    "2026-10-25T02:30:00Z",
                ],
            ),
            // A fixed time from the second pass: it ran on the first.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-10-25T01:10:00Z",
                &[
                    "2026-10-26T01:30:00Z",
                    "2026-10-27T01:30:00Z",
                    "2026-10-28T01:30:00Z",
                ],
            ),
            // Every four years, and not in 2100.
            (
                "0 0 29 2 *",
                "UTC",
                "2096-03-01T00:00:00Z",
                &[
                    "2104-02-29T00:00:00Z",
                    "2108-02-29T00:00:00Z",
                    "2112-02-29T00:00:00Z",
                ],
            ),
        ] {
            assert_eq!(
                schedule(expression, timezone).next_fires(at(after), 3),
                ats(fires),
                "{expression} in {timezone} after {after}"
            );
        }
    }

    #[test]
    fn interval_hint_is_the_shortest_wall_clock_gap() {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        for (expression, timezone, after, hint) in [
            // Across the 23-hour day, still a day.
            (
                "0 3 * * *",
                "Europe/Berlin",
                "2026-03-25T00:00:00Z",
                minutes(24 * 60),
            ),
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2026-03-25T00:00:00Z",
                minutes(24 * 60),
            ),
            (
                "*/30 * * * *",
                "Europe/Berlin",
                "2026-03-29T00:00:00Z",
                minutes(30),
            ),
            (
                "15 * * * *",
                "Europe/Berlin",
                "2026-03-29T00:00:00Z",
                minutes(60),
            ),
            (
                "0 * * * *",
                "Europe/Berlin",
                "2026-10-24T23:30:00Z",
                minutes(60),
            ),
            ("0 3,4 * * *", "UTC", "2026-01-01T00:00:00Z", minutes(60)),
            (
                "0 0 * * MON",
                "UTC",
                "2026-01-01T00:00:00Z",
                minutes(7 * 24 * 60),
            ),
            // Monthly from mid-January: February's 28 days are the least.
            (
                "0 0 1 * *",
                "UTC",
                "2026-01-15T00:00:00Z",
                minutes(28 * 24 * 60),
            ),
        ] {
            assert_eq!(
                schedule(expression, timezone).interval_hint(at(after)),
                hint,
                "{expression} in {timezone} after {after}"
            );
        }
    }

    #[test]
    fn parse_errors_name_the_flag_and_the_fix() {
        let form = "use 5 fields: minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\"";
        for (expression, timezone, expected) in [
            (
                "0 3 * * *",
                "Berlin",
                "--timezone \"Berlin\": not an IANA time zone; use a name like Europe/Berlin or UTC"
                    .to_string(),
            ),
            (
                "0 3 * * *",
                "",
                "--timezone \"\": not an IANA time zone; use a name like Europe/Berlin or UTC"
                    .to_string(),
            ),
            (
                "0 0 3 * * *",
                "UTC",
                format!(
                    "--cron \"0 0 3 * * *\": 6 fields, but seconds and years are not supported \
                     (a backup schedule finer than a minute is a mistake); {form}"
                ),
            ),
            (
                "0 0 3 * * * 2027",
                "UTC",
                format!(
                    "--cron \"0 0 3 * * * 2027\": 7 fields, but seconds and years are not \
                     supported (a backup schedule finer than a minute is a mistake); {form}"
                ),
            ),
            (
                "0 3 * *",
                "UTC",
                format!("--cron \"0 3 * *\": 4 fields; {form}"),
            ),
            ("", "UTC", format!("--cron \"\": empty; {form}")),
            (
                "every day",
                "UTC",
                format!("--cron \"every day\": 2 fields; {form}"),
            ),
            (
                "0 0 30 2 *",
                "UTC",
                "--cron \"0 0 30 2 *\": matches no date; check the day-of-month, month and \
                 day-of-week fields"
                    .to_string(),
            ),
            (
                // The 31st of April, or an empty day-of-week set.
                "0 0 31 4 *",
                "UTC",
                "--cron \"0 0 31 4 *\": matches no date; check the day-of-month, month and \
                 day-of-week fields"
                    .to_string(),
            ),
            (
                "0 3 * * +",
                "UTC",
                "--cron \"0 3 * * +\": matches no date; check the day-of-month, month and \
                 day-of-week fields"
                    .to_string(),
            ),
        ] {
            match CronSchedule::parse(expression, timezone) {
                Err(CoordinatorError::InvalidArgument(message)) => {
                    assert_eq!(message, expected, "{expression:?} in {timezone:?}")
                }
                other => panic!("{expression:?} in {timezone:?}: {other:?}"),
            }
        }
        // The field is named; croner's words say what is wrong with it.
        for (expression, expected) in [
            (
                "61 3 * * *",
                "--cron \"61 3 * * *\": the minute field \"61\" is invalid (",
            ),
            (
                "0 25 * * *",
                "--cron \"0 25 * * *\": the hour field \"25\" is invalid (",
            ),
            (
                "0 3 32 * *",
                "--cron \"0 3 32 * *\": the day-of-month field \"32\" is invalid (",
            ),
            (
                "0 3 * 13 *",
                "--cron \"0 3 * 13 *\": the month field \"13\" is invalid (",
            ),
            (
                "0 3 * * FOO",
                "--cron \"0 3 * * FOO\": the day-of-week field \"FOO\" is invalid (",
            ),
            (
                "0 3 * ? *",
                "--cron \"0 3 * ? *\": the month field \"?\" is invalid (",
            ),
        ] {
            match CronSchedule::parse(expression, "UTC") {
                Err(CoordinatorError::InvalidArgument(message)) => assert!(
                    message.starts_with(expected) && message.ends_with(&format!("); {form}")),
                    "{message}"
                ),
                other => panic!("{expression:?}: {other:?}"),
            }
        }
        match CronSchedule::parse("@never", "UTC") {
            Err(CoordinatorError::InvalidArgument(message)) => assert_eq!(
                message,
                "--cron \"@never\": not a nickname cron knows; use @yearly, @monthly, \
                 @weekly, @daily or @hourly, or 5 fields: minute hour day-of-month month \
                 day-of-week, e.g. \"0 3 * * *\""
            ),
            other => panic!("@never: {other:?}"),
        }
    }

    #[test]
    fn a_schedule_is_parsed_once_per_expression_and_zone() {
        // An expression no other test uses, so no other thread has cached
        // it first.
        let expression = "17 4 * * 3";
        let uncached = || UNCACHED_PARSES.with(Cell::get);
        let before = uncached();
        let berlin = schedule(expression, "Europe/Berlin");
        assert_eq!(uncached(), before + 1);
        for _ in 0..3 {
            let again = schedule(expression, "Europe/Berlin");
            assert_eq!(again.expression(), expression);
            assert_eq!(again.timezone(), "Europe/Berlin");
            assert_eq!(
                again.next_fires(at("2026-01-01T00:00:00Z"), 2),
                berlin.next_fires(at("2026-01-01T00:00:00Z"), 2)
            );
        }
        assert_eq!(uncached(), before + 1);
        // Another zone is another schedule.
        let utc = schedule(expression, "UTC");
        assert_eq!(uncached(), before + 2);
        assert_eq!(utc.timezone(), "UTC");
        assert_ne!(
            utc.next_fires(at("2026-01-01T00:00:00Z"), 1),
            berlin.next_fires(at("2026-01-01T00:00:00Z"), 1)
        );
        // An error is not kept: asked again, it is worked out again.
        for attempt in 1..=2 {
            assert!(CronSchedule::parse("17 4 30 2 *", "UTC").is_err());
            assert_eq!(uncached(), before + 2 + attempt);
        }
    }

    #[test]
    fn parse_accepts_a_pattern_whose_only_dates_are_rare() {
        for expression in [
            "0 0 29 2 *",
            "0 0 31 12 *",
            // A fifth Monday in February: only in a leap year that starts
            // February on a Monday (1988, then 2016).
            "0 0 * 2 MON#5",
            "0 0 L 2 *",
        ] {
            assert!(
                CronSchedule::parse(expression, "UTC").is_ok(),
                "{expression}"
            );
        }
    }

    #[test]
    fn parse_keeps_the_strings_as_given() {
        let nightly = schedule("0 3 * * *", "Europe/Berlin");
        assert_eq!(nightly.expression(), "0 3 * * *");
        assert_eq!(nightly.timezone(), "Europe/Berlin");
        let weekly = schedule("@weekly", "America/New_York");
        assert_eq!(weekly.expression(), "@weekly");
        assert_eq!(weekly.timezone(), "America/New_York");
    }

    #[test]
    fn spread_offset_is_stable_within_the_spread_and_spreads_a_fleet() {
        let two_hours = Duration::from_secs(2 * 3600);
        // Pinned: changing the hash would move every target's slot, and
        // each target would run twice or not at all on the day of the
        // upgrade.
        let offset = spread_offset("nightly", "db1/main/app", two_hours);
        assert_eq!(offset, Duration::from_millis(2_178_021));
        assert_eq!(offset, spread_offset("nightly", "db1/main/app", two_hours));
        assert!(offset < two_hours);
        assert_ne!(offset, spread_offset("weekly", "db1/main/app", two_hours));
        assert_ne!(
            offset,
            spread_offset("nightly", "db1/main/billing", two_hours)
        );
        // The parts are length-prefixed: moving a boundary changes the hash.
        assert_ne!(
            spread_offset("ab", "c", two_hours),
            spread_offset("a", "bc", two_hours)
        );

        assert_eq!(
            spread_offset("nightly", "db1/main/app", Duration::ZERO),
            Duration::ZERO
        );
        assert_eq!(
            spread_offset("nightly", "db1/main/app", Duration::from_micros(900)),
            Duration::ZERO
        );
        assert!(spread_offset("nightly", "db1/main/app", Duration::MAX) < Duration::MAX);

        // 1000 targets over 2 hours: every 10-minute bucket gets a share
        // (83 on average).
        let mut buckets = [0u32; 12];
        for target in 0..1000 {
            let offset = spread_offset("nightly", &format!("db{target}/main/app"), two_hours);
            assert!(offset < two_hours, "{offset:?}");
            buckets[(offset.as_secs() / 600) as usize] += 1;
        }
        assert!(buckets.iter().all(|&count| count >= 50), "{buckets:?}");
    }

    #[test]
    fn due_fires_runs_the_catch_up_window_and_counts_the_rest_missed() {
        let hourly = schedule("0 * * * *", "UTC");
        let hours = |h: u64| Duration::from_secs(h * 3600);
        let at_hours = |list: &[u32]| -> Vec<DateTime<Utc>> {
            list.iter()
                .map(|h| at(&format!("2026-01-01T{h:02}:00:00Z")))
                .collect()
        };
        for (now, catch_up, run, missed) in [
            // Three hours of catch-up from 10:10: 08:00 to 10:00 run.
            (
                "2026-01-01T10:10:00Z",
                hours(3),
                vec![8, 9, 10],
                vec![1, 2, 3, 4, 5, 6, 7],
            ),
            // A fire exactly `catch_up` old still runs.
            (
                "2026-01-01T10:00:00Z",
                hours(2),
                vec![8, 9, 10],
                vec![1, 2, 3, 4, 5, 6, 7],
            ),
            // No catch-up: only a fire within the late-tick grace runs.
            (
                "2026-01-01T10:00:30Z",
                Duration::ZERO,
                vec![10],
                vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            ),
            (
                "2026-01-01T10:01:00Z",
                Duration::ZERO,
                vec![10],
                vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            ),
            (
                "2026-01-01T10:01:01Z",
                Duration::ZERO,
                vec![],
                vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            ),
            // A catch-up longer than the outage: everything runs.
            ("2026-01-01T03:30:00Z", hours(6), vec![1, 2, 3], vec![]),
        ] {
            let due = due_fires(&hourly, at("2026-01-01T00:30:00Z"), at(now), catch_up);
            assert_eq!(
                due,
                DueFires {
                    run: at_hours(&run),
                    missed: at_hours(&missed),
                    missed_beyond_cap: 0
                },
                "now {now}, catch-up {catch_up:?}"
            );
        }
        // A clock set back, or an empty window: nothing.
        for now in ["2026-01-01T00:30:00Z", "2026-01-01T00:00:00Z"] {
            assert_eq!(
                due_fires(&hourly, at("2026-01-01T00:30:00Z"), at(now), hours(6)),
                DueFires::default()
            );
        }
    }

    #[test]
    fn due_fires_lists_the_newest_missed_up_to_the_cap() {
        // A day down, minutely, no catch-up: 1440 fires (00:01 to 24:00);
        // 23:59 and 00:00 are within the grace and run.
        let minutely = schedule("* * * * *", "UTC");
        let due = due_fires(
            &minutely,
            at("2026-01-01T00:00:00Z"),
            at("2026-01-02T00:00:00Z"),
            Duration::ZERO,
        );
        assert_eq!(
            due.run,
            ats(&["2026-01-01T23:59:00Z", "2026-01-02T00:00:00Z"])
        );
        assert_eq!(due.missed.len(), MISSED_CAP);
        assert_eq!(due.missed.first(), Some(&at("2026-01-01T22:19:00Z")));
        assert_eq!(due.missed.last(), Some(&at("2026-01-01T23:58:00Z")));
        assert!(due.missed.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(due.missed_beyond_cap, 1438 - MISSED_CAP as u64);
    }

    #[test]
    fn consecutive_windows_see_every_fire_exactly_once() {
        // Ticks at uneven steps across both 2026 changes in Berlin and New
        // York; each tick's window starts where the last one ended.
        let steps = [7, 61, 1, 29, 180, 59, 3, 240];
        for (expression, timezone) in [
            ("*/30 * * * *", "Europe/Berlin"),
            ("30 2 * * *", "Europe/Berlin"),
            ("0,30 2 * * *", "Europe/Berlin"),
            ("15 * * * *", "Europe/Berlin"),
            ("0 * * * *", "Europe/Berlin"),
            ("* 2 * * *", "Europe/Berlin"),
            ("0 * * * *", "America/New_York"),
            ("30 1 * * *", "America/New_York"),
        ] {
            let schedule = schedule(expression, timezone);
            for (start, end) in [
                ("2026-03-06T00:00:00Z", "2026-03-10T00:00:00Z"),
                ("2026-03-27T00:00:00Z", "2026-03-31T00:00:00Z"),
                ("2026-10-23T00:00:00Z", "2026-10-27T00:00:00Z"),
                ("2026-10-30T00:00:00Z", "2026-11-03T00:00:00Z"),
            ] {
                let (start, end) = (at(start), at(end));
                let mut seen = Vec::new();
                let mut last_evaluated = start;
                let mut step = steps.iter().cycle();
                while last_evaluated < end {
                    let minutes = i64::from(*step.next().unwrap_or(&1));
                    let now = (last_evaluated + TimeDelta::minutes(minutes)).min(end);
                    let due = due_fires(&schedule, last_evaluated, now, Duration::from_secs(3600));
                    assert_eq!(due.missed_beyond_cap, 0);
                    seen.extend(due.missed);
                    seen.extend(due.run);
                    last_evaluated = now;
                }
                let all = schedule.fires_between(start, end, usize::MAX);
                assert!(!all.is_empty());
                assert!(all.windows(2).all(|pair| pair[0] < pair[1]));
                assert_eq!(seen, all, "{expression} in {timezone} from {start}");
            }
        }
    }
}
