//! Retention: which backups a policy keeps. `policy` is what a policy says
//! (the `--keep-*` rules, stored as JSON) and the checks that refuse a
//! meaningless one; `rules` applies restic's `forget` semantics to one
//! group of backups and says, for each, every rule that keeps it; `times`
//! reads the times file of `cairn retention simulate`; `apply` applies a
//! stored policy to the catalog's backups, lineage by lineage, with the
//! guards (the newest complete backup, a newer one before any deletion,
//! backups in a queued or running restore, protected backups, a policy
//! that would remove everything) on top, and deletes.
//!
//! `policy`, `rules` and `times` are pure functions of their arguments: no
//! clock, no catalog. `simulate` and `apply` go through the same
//! [`decide`].

pub mod apply;
pub mod automatic;
pub mod policy;
pub mod rules;
pub mod times;

pub use policy::Policy;
pub use rules::{Candidate, Decision, Fate, KeepReason, Period, decide};

#[cfg(test)]
mod apply_tests;
#[cfg(test)]
mod tests;
