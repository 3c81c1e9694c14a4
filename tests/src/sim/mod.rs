//! A deterministic simulator of elector's elections in virtual time, with the single-leader
//! oracle checked at every virtual instant.
//!
//! What runs is the production election machine ([`Contender`]), unchanged, one per election
//! per broker, driven the way `broker/src/registry/task.rs` drives it (poll, then a read, a
//! write or a wait; results, watch observations and parties joining and leaving fed back). What
//! is simulated is only I/O and time:
//! - an in-memory API server with the real semantics: a resourceVersion compare-and-swap on
//!   create and replace, 409 on a stale version or an existing object, 404 on a missing one;
//!   watches that lag, stall, drop events and re-list;
//! - the network between each broker and the server, and the Unix sockets between brokers and
//!   their apps;
//! - apps (campaign, resign, observe, crash, and the protocol 1.1 jeopardy and resume);
//! - each node's clocks.
//!
//! # Scheduler
//! A purpose-built one rather than a paused tokio runtime (or turmoil/madsim): the machine is
//! I/O-free and takes its instants as arguments, so nothing needs a runtime. Every message,
//! timer and API answer is an event in one priority queue ordered by virtual time, ties broken
//! by a draw from the schedule's seeded RNG; latencies are drawn from the same RNG, so requests,
//! answers and watch events reorder. One seed fixes the whole schedule: a run is a pure
//! function of its seed, single-threaded, with no wall-clock reads.
//!
//! # Clocks (the bounds, against the safety argument in `elector_broker::election`)
//! Each node has its own monotonic clock: `local(t) = origin + offset + t × (1 + drift)` with
//! `offset` up to an hour and `|drift| ≤ 1 %`, and its own wall clock skewed by up to ±1 hour.
//! The machine only ever compares instants of one node's clock (a leader's deadline with its
//! own `last_renew_start`; a foreign record's expiry with its own `seen_at`), and apps share
//! their node's clock, so offsets are harmless. Drift is not: a leader is told `lost` after
//! `renew_deadline` of its own clock, another node takes over after `lease_duration` of its
//! clock, so safety needs `renew_deadline / (1 − ρ) < lease_duration / (1 + ρ)`, i.e.
//! `ρ < (L − R) / (L + R)`: 20 % for 15 s / 10 s, 33 % for 3 s / 1.5 s. Real clocks drift by
//! parts per million (NTP slews at most 500 ppm); 1 % is twenty times that and five times
//! below the bound.
//!
//! # Oracle
//! See [`oracle`]. A failure carries the seed, the violation and the schedule's trace; a
//! failing seed is shrunk by replaying it with fewer fault actions (the faults are drawn from
//! their own RNG stream, so dropping some keeps the rest of the schedule).

pub mod oracle;
mod world;

pub use world::{Config, Mutation, Outcome, Stats, run_schedule};

use std::time::Duration;

/// Runs `schedules` schedules from `first_seed` on; stops at the first violation.
pub fn run_many(first_seed: u64, schedules: u64, mutation: Option<Mutation>) -> (Stats, Option<Outcome>) {
    let mut total = Stats::default();
    for i in 0..schedules {
        let seed = first_seed.wrapping_add(i);
        let outcome = run_schedule(&Config::for_seed(seed, mutation));
        total.add(&outcome.stats);
        if outcome.violation.is_some() {
            return (total, Some(outcome));
        }
    }
    (total, None)
}

/// Replays a failing seed with fewer and fewer fault actions while it still fails, and returns
/// the smallest failing outcome found.
pub fn shrink(failing: Outcome, mutation: Option<Mutation>) -> Outcome {
    let mut best = failing;
    let mut limit = best.fault_actions;
    while limit > 0 {
        limit /= 2;
        let mut config = Config::for_seed(best.seed, mutation);
        config.max_fault_actions = Some(limit);
        let o = run_schedule(&config);
        if o.violation.is_some() {
            best = o;
        } else {
            break;
        }
    }
    best
}

/// Virtual time as hours, for reports.
pub fn hours(d: Duration) -> f64 {
    d.as_secs_f64() / 3600.0
}
