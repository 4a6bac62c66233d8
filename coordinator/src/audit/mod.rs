//! The audit log's hash chain. Each row's hash is SHA-256 over the previous
//! row's hash and the row's own fields, each length-prefixed so that no two
//! different rows can hash alike. Editing a row breaks its own hash;
//! deleting one breaks the next row's link. (Deleting the newest rows is
//! invisible to a chain alone; later issues can anchor the head elsewhere.)
//!
//! Storage is the catalog's business; this module only hashes and checks.

pub mod log;

use serde::Serialize;

/// The `prev_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Refused,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// An event to append. Never put a secret in any field.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub actor: String,
    pub action: &'static str,
    pub target: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// Longest stored actor or target, in characters.
const NAME_FIELD_MAX_CHARS: usize = 200;
/// Longest stored detail, in characters.
const DETAIL_MAX_CHARS: usize = 1000;

/// Fields may come from unauthenticated callers: control characters would
/// forge log lines and unbounded text would bloat the log, so both go.
fn clean(text: String, max_chars: usize) -> String {
    let needs_cleaning = text.chars().count() > max_chars || text.chars().any(char::is_control);
    if !needs_cleaning {
        return text;
    }
    let mut cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect();
    if text.chars().count() > max_chars {
        cleaned.push('…');
    }
    cleaned
}

impl AuditEvent {
    pub fn new(
        actor: impl Into<String>,
        action: &'static str,
        target: impl Into<String>,
        outcome: Outcome,
        detail: impl Into<String>,
    ) -> Self {
        AuditEvent {
            actor: clean(actor.into(), NAME_FIELD_MAX_CHARS),
            action,
            target: clean(target.into(), NAME_FIELD_MAX_CHARS),
            outcome,
            detail: clean(detail.into(), DETAIL_MAX_CHARS),
        }
    }
}

/// A stored row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

pub struct HashInput<'a> {
    pub prev_hash: &'a str,
    pub id: i64,
    pub at: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub outcome: &'a str,
    pub detail: &'a str,
}

pub fn row_hash(input: &HashInput<'_>) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let id = input.id.to_string();
    let at = input.at.to_string();
    for field in [
        input.prev_hash,
        &id,
        &at,
        input.actor,
        input.action,
        input.target,
        input.outcome,
        input.detail,
    ] {
        context.update(&(field.len() as u64).to_be_bytes());
        context.update(field.as_bytes());
    }
    hex::encode(context.finish())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub rows_checked: u64,
    /// The id of the first bad row, if any.
    pub first_bad_row: Option<i64>,
    pub problem: Option<String>,
}

/// Checks rows in id order.
pub fn verify(rows: &[AuditRow]) -> VerifyReport {
    let mut chain = ChainVerifier::default();
    match chain.feed(rows) {
        Some(bad) => bad,
        None => chain.finish(),
    }
}

/// Checks the chain a page of rows at a time, so that `audit verify` holds
/// one page in memory however long the log is.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_prev: String,
    previous_id: i64,
    rows_checked: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            expected_prev: GENESIS_HASH.to_string(),
            previous_id: 0,
            rows_checked: 0,
        }
    }
}

impl ChainVerifier {
    /// The id of the last row checked (0 before the first): where the next
    /// page starts.
    pub fn last_id(&self) -> i64 {
        self.previous_id
    }

    /// Checks the next rows (in id order, after those fed before); the
    /// report of the first bad row, if any.
    pub fn feed(&mut self, rows: &[AuditRow]) -> Option<VerifyReport> {
        for row in rows {
            self.rows_checked += 1;
            let bad = |problem: String| VerifyReport {
                ok: false,
                rows_checked: self.rows_checked,
                first_bad_row: Some(row.id),
                problem: Some(problem),
            };
            if row.prev_hash != self.expected_prev {
                return Some(bad(format!(
                    "row {} does not link to the row before it (id {}): a row was deleted or edited",
                    row.id, self.previous_id
                )));
            }
            let recomputed = row_hash(&HashInput {
                prev_hash: &row.prev_hash,
                id: row.id,
                at: row.at,
                actor: &row.actor,
                action: &row.action,
                target: &row.target,
                outcome: &row.outcome,
                detail: &row.detail,
            });
            if recomputed != row.hash {
                return Some(bad(format!(
                    "row {} was edited: its hash does not match its fields",
                    row.id
                )));
            }
            self.expected_prev.clone_from(&row.hash);
            self.previous_id = row.id;
        }
        None
    }

    /// The report once every row was fed without a bad one.
    pub fn finish(self) -> VerifyReport {
        VerifyReport {
            ok: true,
            rows_checked: self.rows_checked,
            first_bad_row: None,
            problem: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut rows = Vec::new();
        let mut prev = GENESIS_HASH.to_string();
        for id in 1..=n {
            let actor = format!("actor{id}");
            let hash = row_hash(&HashInput {
                prev_hash: &prev,
                id,
                at: id * 10,
                actor: &actor,
                action: "test",
                target: "t",
                outcome: "success",
                detail: "",
            });
            rows.push(AuditRow {
                id,
                at: id * 10,
                actor,
                action: "test".into(),
                target: "t".into(),
                outcome: "success".into(),
                detail: String::new(),
                prev_hash: prev.clone(),
                hash: hash.clone(),
            });
            prev = hash;
        }
        rows
    }

    fn check(rows: &[AuditRow], expected_first_bad: Option<i64>) {
        assert_eq!(verify(rows).first_bad_row, expected_first_bad);
    }

    #[test]
    fn detects_edits_and_deletions() {
        let rows = chain(5);
        check(&rows, None);

        let mut edited = rows.clone();
        edited[2].detail = "changed".into();
        check(&edited, Some(3));

        let mut deleted = rows.clone();
        deleted.remove(1);
        check(&deleted, Some(3));

        let mut rehashed = rows.clone();
        rehashed[1].actor = "mallory".into();
        rehashed[1].hash = row_hash(&HashInput {
            prev_hash: &rehashed[1].prev_hash,
            id: 2,
            at: 20,
            actor: "mallory",
            action: "test",
            target: "t",
            outcome: "success",
            detail: "",
        });
        // Recomputing the edited row's hash breaks the next row's link.
        check(&rehashed, Some(3));
    }

    #[test]
    fn untrusted_fields_are_cleaned_and_bounded() {
        let event = AuditEvent::new(
            "a\nfake line",
            "x",
            "t".repeat(5000),
            Outcome::Refused,
            "d\r\n",
        );
        assert_eq!(event.actor, "a fake line");
        assert_eq!(event.target.chars().count(), NAME_FIELD_MAX_CHARS + 1);
        assert_eq!(event.detail, "d  ");
    }

    #[test]
    fn field_boundaries_matter() {
        let a = row_hash(&HashInput {
            prev_hash: GENESIS_HASH,
            id: 1,
            at: 1,
            actor: "ab",
            action: "c",
            target: "",
            outcome: "",
            detail: "",
        });
        let b = row_hash(&HashInput {
            prev_hash: GENESIS_HASH,
            id: 1,
            at: 1,
            actor: "a",
            action: "bc",
            target: "",
            outcome: "",
            detail: "",
        });
        assert_ne!(a, b);
    }
}
