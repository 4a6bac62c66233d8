//! Retention: which backups a policy keeps. `policy` is what a policy says
//! (the `--keep-*` rules, stored as JSON) and the checks that refuse a
//! meaningless one; `rules` applies restic's `forget` semantics to one
//! group of backups and says, for each, every rule that keeps it; `times`
//! reads the times file of `cairn retention simulate`.
//!
//! Pure functions of their arguments: no clock, no catalog. `simulate` and
//! the catalog-backed `retention apply` go through the same [`decide`]; the
//! guards that need the catalog (the newest complete backup, backups in a
//! running restore, protected backups) are applied on top by the caller.

pub mod policy;
pub mod rules;
pub mod times;

pub use policy::Policy;
pub use rules::{Candidate, Decision, Fate, KeepReason, Period, decide};

#[cfg(test)]
mod tests;
