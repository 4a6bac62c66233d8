//! Fleet schedules live here: `cairn schedule create nightly --cron
//! "0 3 * * *" --timezone Europe/Berlin ...` makes one job per target for
//! each fire time. `timing` owns when a schedule fires (cron in an IANA
//! zone, DST rules, the fleet spread, catch-up); it is pure, so the engine
//! that turns fires into jobs can be tested against exact instants.

pub mod timing;
