//! The deterministic simulator (`elector_tests::sim`): thousands of fault schedules in virtual
//! time against the production election machine, with the single-leader oracle; and the proof
//! that the oracle bites: each known bug class, switched on, is found within the default budget.
//!
//! `ELECTOR_SIM_SEED` replays one schedule (printing its trace); `ELECTOR_SIM_SCHEDULES` sets
//! how many schedules the main test runs (default 10,000).

use elector_broker::election::machine::mutation::{self as machine_mutation, Mutation as MachineMutation};
use elector_tests::sim::{Mutation, Outcome, Stats, hours, run_many, shrink};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn report(what: &str, s: &Stats, cpu: std::time::Duration) {
    println!(
        "sim {what}: {} schedules, {:.1} virtual hours, {} leadership transitions checked, {} oracle checks, {} fault actions, {} events, {:.1} s elapsed (one thread)",
        s.schedules,
        hours(s.virtual_time),
        s.transitions,
        s.checks,
        s.fault_actions,
        s.events,
        cpu.as_secs_f64()
    );
}

fn describe(o: &Outcome) -> String {
    let tail: Vec<&String> = o
        .trace
        .iter()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!(
        "seed {} ({} fault actions): {}\nreplay: ELECTOR_SIM_SEED={} cargo nextest run -p elector-tests --test sim\ntrace (last {} lines):\n{}",
        o.seed,
        o.fault_actions,
        o.violation.as_deref().unwrap_or("none"),
        o.seed,
        tail.len(),
        tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    )
}

#[test]
fn thousands_of_schedules_never_two_leaders() {
    machine_mutation::set(None);
    let started = std::time::Instant::now();
    if let Some(seed) = env_u64("ELECTOR_SIM_SEED") {
        let (stats, failed) = run_many(seed, 1, None);
        report("replay", &stats, started.elapsed());
        if let Some(o) = failed {
            panic!("{}", describe(&shrink(o, None)));
        }
        return;
    }
    let schedules = env_u64("ELECTOR_SIM_SCHEDULES").unwrap_or(10_000);
    let first = env_u64("ELECTOR_SIM_FIRST_SEED").unwrap_or(1);
    let (stats, failed) = run_many(first, schedules, None);
    report("run", &stats, started.elapsed());
    if let Some(o) = failed {
        panic!("{}", describe(&shrink(o, None)));
    }
    assert_eq!(stats.schedules, schedules);
    assert!(
        stats.transitions > schedules,
        "schedules elect leaders: {stats:?}"
    );
}

/// Runs the default budget's seeds with one bug switched on; the oracle must find it.
fn finds(mutation: Mutation, machine: Option<MachineMutation>) {
    machine_mutation::set(machine);
    let started = std::time::Instant::now();
    let (stats, failed) = run_many(1, 10_000, Some(mutation));
    machine_mutation::set(None);
    report(&format!("{mutation:?}"), &stats, started.elapsed());
    let o = failed.unwrap_or_else(|| panic!("{mutation:?} not found in {} schedules", stats.schedules));
    println!(
        "{mutation:?} found after {} schedules:\n{}",
        stats.schedules,
        describe(&o)
    );
    // The same schedule without the bug passes: the bug, not the schedule, broke the rule.
    let (_, clean) = run_many(o.seed, 1, None);
    assert!(clean.is_none(), "seed {} fails without {mutation:?} too", o.seed);
}

#[test]
fn finds_renewing_past_the_deadline() {
    finds(
        Mutation::RenewPastDeadline,
        Some(MachineMutation::RenewPastDeadline),
    );
}

#[test]
fn finds_expiry_judged_by_wall_clock() {
    finds(Mutation::WallClockExpiry, Some(MachineMutation::WallClockExpiry));
}

#[test]
fn finds_a_release_without_cas() {
    finds(Mutation::ReleaseWithoutCas, None);
}

#[test]
fn finds_resume_without_checking_the_term() {
    finds(Mutation::ResumeAnyTerm, Some(MachineMutation::ResumeAnyTerm));
}
