//! Fleet schedules live here: `cairn schedule create nightly --cron
//! "0 3 * * *" --timezone Europe/Berlin ...` makes one job per target for
//! each fire time. `timing` owns when a schedule fires (cron in an IANA
//! zone, DST rules, the fleet spread, catch-up); it is pure, so the engine
//! that turns fires into jobs can be tested against exact instants.
//! `targets` works out what a schedule covers when it fires, `fire` turns
//! due fires into job rows at each engine tick, `manage` is the schedule
//! commands' side (checks, show, pause, run-now).

pub mod coverage;
pub mod fire;
pub mod manage;
pub mod targets;
pub mod timing;
