//! The backup times `cairn retention simulate --times FILE` reads: one
//! RFC 3339 time a line, blank lines and `#` comments skipped.

use chrono::{DateTime, Utc};

use crate::{CoordinatorError, Result};

/// One time read from the file, with the line it came from (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeLine {
    pub line: usize,
    pub time: DateTime<Utc>,
}

/// Reads `text`; `source` names the file in errors. A line that is not a
/// time is refused with its number and the expected form, and so is a
/// file that holds no time at all.
pub fn parse_times(text: &str, source: &str) -> Result<Vec<TimeLine>> {
    let mut times = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let time = DateTime::parse_from_rfc3339(trimmed).map_err(|error| {
            CoordinatorError::InvalidArgument(format!(
                "{source} line {}: {trimmed:?} is not an RFC 3339 time ({error}); \
                 write one time a line, such as 2026-03-04T03:00:00Z or \
                 2026-03-04T04:00:00+01:00 (blank lines and lines starting with # are skipped)",
                index + 1
            ))
        })?;
        times.push(TimeLine {
            line: index + 1,
            time: time.with_timezone(&Utc),
        });
    }
    if times.is_empty() {
        return Err(CoordinatorError::InvalidArgument(format!(
            "{source} holds no backup times: write one RFC 3339 time a line, \
             such as 2026-03-04T03:00:00Z"
        )));
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_comments_and_blank_lines() {
        let text = "# nightly\n\n2026-03-04T03:00:00Z\n  2026-03-05T04:00:00+01:00  \n# end\n";
        let times = parse_times(text, "times.txt").unwrap();
        let expected = [(3, "2026-03-04T03:00:00Z"), (4, "2026-03-05T03:00:00Z")];
        assert_eq!(times.len(), expected.len());
        for (got, (line, time)) in times.iter().zip(expected) {
            assert_eq!(got.line, line);
            assert_eq!(got.time, time.parse::<DateTime<Utc>>().unwrap());
        }
    }

    #[test]
    fn a_bad_line_is_refused_with_its_number_and_the_form() {
        for (text, words) in [
            (
                "2026-03-04T03:00:00Z\n\n2026-03-05 03:00\n",
                &[
                    "times.txt line 3",
                    "\"2026-03-05 03:00\"",
                    "RFC 3339",
                    "2026-03-04T03:00:00Z",
                ][..],
            ),
            (
                "# only a comment\n\n",
                &["times.txt holds no backup times"][..],
            ),
            ("2026-02-30T03:00:00Z\n", &["times.txt line 1"][..]),
        ] {
            let error = parse_times(text, "times.txt").unwrap_err().to_string();
            for word in words {
                assert!(error.contains(word), "{text:?}: {error:?} lacks {word:?}");
            }
        }
    }
}
