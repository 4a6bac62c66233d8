//! What a retention policy says (`--keep-last`, `--keep-hourly` ...
//! `--keep-within`, `--min-keep`), stored as JSON in the catalog, and the
//! checks that refuse a policy that means nothing or keeps nothing.

use std::fmt;
use std::time::Duration;

use cairn_common::config::display_duration;
use serde::{Deserialize, Serialize};

use crate::{CoordinatorError, Result};

/// The rule flags, for messages that must name them all.
const RULE_FLAGS: &str = "--keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly \
     or --keep-within";

/// A retention policy. Each rule keeps some backups; the rules are ORed (a
/// backup is kept if any rule keeps it), as restic's `forget` has them. See
/// [`super::decide`] for what each rule keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The N newest backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// The newest backup of each of the last N hours that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// ...of each of the last N days that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// ...of each of the last N ISO weeks that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// ...of each of the last N months that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// ...of each of the last N years that have backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Every backup younger than this, counted back from the newest
    /// backup (not from now). Stored as "7d", "36h".
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub keep_within: Option<Duration>,
    /// At least the N newest backups, whatever the rules say: a floor, not
    /// a rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_keep: Option<u32>,
}

impl Policy {
    /// Refuses a policy without a rule (it would keep nothing, or with
    /// `--min-keep` alone only the floor) and zero counts or durations,
    /// which keep nothing and are always a mistake. Errors name the flag
    /// and the fix.
    pub fn validate(&self) -> Result<()> {
        let counts = [
            ("--keep-last", self.keep_last),
            ("--keep-hourly", self.keep_hourly),
            ("--keep-daily", self.keep_daily),
            ("--keep-weekly", self.keep_weekly),
            ("--keep-monthly", self.keep_monthly),
            ("--keep-yearly", self.keep_yearly),
            ("--min-keep", self.min_keep),
        ];
        for (flag, count) in counts {
            if count == Some(0) {
                return Err(invalid(format!(
                    "{flag} 0 keeps nothing: give a count of at least 1, or leave {flag} out"
                )));
            }
        }
        if self.keep_within.is_some_and(|within| within.is_zero()) {
            return Err(invalid(
                "--keep-within 0s keeps nothing: give a duration such as 7d or 36h, \
                 or leave --keep-within out"
                    .to_string(),
            ));
        }
        if !self.has_rule() {
            let floor = if self.min_keep.is_some() {
                " (--min-keep is only a floor under the rules, not a rule)"
            } else {
                ""
            };
            return Err(invalid(format!(
                "a retention policy needs at least one rule: {RULE_FLAGS}{floor}; \
                 for example --keep-daily 7 --keep-weekly 4"
            )));
        }
        Ok(())
    }

    /// Reads a policy as the catalog stores it (`name` for the message):
    /// a row that does not read is a bug, not the caller's mistake.
    pub fn from_stored(name: &str, json: &str) -> Result<Policy> {
        serde_json::from_str(json).map_err(|e| {
            CoordinatorError::Internal(format!(
                "retention policy {name:?} as stored does not read: {e}"
            ))
        })
    }

    fn has_rule(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
            || self.keep_within.is_some()
    }
}

fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message)
}

/// The policy as the flags that make it: `--keep-daily 7 --keep-weekly 4`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut flags = Vec::new();
        let counts = [
            ("--keep-last", self.keep_last),
            ("--keep-hourly", self.keep_hourly),
            ("--keep-daily", self.keep_daily),
            ("--keep-weekly", self.keep_weekly),
            ("--keep-monthly", self.keep_monthly),
            ("--keep-yearly", self.keep_yearly),
        ];
        for (flag, count) in counts {
            if let Some(count) = count {
                flags.push(format!("{flag} {count}"));
            }
        }
        if let Some(within) = self.keep_within {
            flags.push(format!("--keep-within {}", display_duration(within)));
        }
        if let Some(min_keep) = self.min_keep {
            flags.push(format!("--min-keep {min_keep}"));
        }
        f.write_str(&flags.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each policy and the words its refusal must contain.
    #[test]
    fn policies_that_mean_nothing_are_refused_naming_the_flag_and_the_fix() {
        let cases: [(Policy, &[&str]); 6] = [
            (
                Policy::default(),
                &[
                    "at least one rule",
                    "--keep-last",
                    "--keep-daily",
                    "--keep-within",
                ],
            ),
            (
                Policy {
                    min_keep: Some(3),
                    ..Policy::default()
                },
                &["at least one rule", "--min-keep is only a floor"],
            ),
            (
                Policy {
                    keep_daily: Some(0),
                    keep_weekly: Some(4),
                    ..Policy::default()
                },
                &[
                    "--keep-daily 0 keeps nothing",
                    "at least 1",
                    "leave --keep-daily out",
                ],
            ),
            (
                Policy {
                    keep_last: Some(0),
                    ..Policy::default()
                },
                &["--keep-last 0 keeps nothing"],
            ),
            (
                Policy {
                    keep_within: Some(Duration::ZERO),
                    ..Policy::default()
                },
                &["--keep-within 0s keeps nothing", "such as 7d"],
            ),
            (
                Policy {
                    keep_daily: Some(7),
                    min_keep: Some(0),
                    ..Policy::default()
                },
                &["--min-keep 0 keeps nothing", "leave --min-keep out"],
            ),
        ];
        for (policy, words) in cases {
            let error = policy
                .validate()
                .expect_err(&format!("{policy:?} was accepted"))
                .to_string();
            for word in words {
                assert!(error.contains(word), "{policy:?}: {error:?} lacks {word:?}");
            }
        }
    }

    #[test]
    fn a_policy_with_one_rule_is_valid() {
        for policy in [
            Policy {
                keep_last: Some(1),
                ..Policy::default()
            },
            Policy {
                keep_yearly: Some(1),
                min_keep: Some(5),
                ..Policy::default()
            },
            Policy {
                keep_within: Some(Duration::from_secs(3600)),
                ..Policy::default()
            },
        ] {
            policy
                .validate()
                .unwrap_or_else(|e| panic!("{policy:?}: {e}"));
        }
    }

    /// The catalog stores policies as JSON: durations as text, absent
    /// rules left out, unknown keys refused.
    #[test]
    fn policies_round_trip_through_json() {
        let policy = Policy {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_within: Some(Duration::from_secs(2 * 86_400)),
            min_keep: Some(3),
            ..Policy::default()
        };
        let json = serde_json::to_string(&policy).unwrap();
        assert_eq!(
            json,
            r#"{"keep_daily":7,"keep_weekly":4,"keep_within":"2days","min_keep":3}"#
        );
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), policy);
        assert!(serde_json::from_str::<Policy>(r#"{"keep_dayly":7}"#).is_err());
        assert_eq!(
            policy.to_string(),
            "--keep-daily 7 --keep-weekly 4 --keep-within 2d --min-keep 3"
        );
    }
}
