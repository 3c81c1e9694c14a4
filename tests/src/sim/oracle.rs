//! The oracle: what every app believes, and the rules it must never break.
//!
//! An app leads from the moment it *receives* `elected` (or `resumed`) until it receives
//! `lost`, crashes, or resigns (it stops acting before it asks). A prompt reader connected to
//! its broker counts as leading until told otherwise, whatever its `valid_until`: the broker
//! must say `lost` before anyone else can take over. An app in jeopardy (its broker went away)
//! counts as leading until its `valid_until`. A slow reader, which learns late by definition,
//! is held to what PROTOCOL.md promises it: it may act until its last `valid_until` without
//! hearing more, so it counts as leading until then.
//!
//! Rules, checked whenever a leadership begins (intervals can only overlap if one begins while
//! another holds, so this is every virtual instant):
//! - at most one app leads each election;
//! - every `elected` carries a term higher than any before in that election (fencing tokens);
//! - a `resumed` confirms exactly the term the app claimed. (Whether another live process
//!   still leads in that term is the first rule's business; a restarted container of the same
//!   identity may legitimately take over its dead predecessor's term.)
//!
//! Liveness is checked by the simulator after the faults heal.

use std::time::Duration;

/// One app's belief.
#[derive(Debug, Clone, Default)]
pub struct Belief {
    /// Leading in `term` until `until` (`None`: until told otherwise).
    pub lead: Option<(u64, Option<Duration>)>,
}

/// How a leadership begins.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    Elected,
    Resumed { claimed: Option<u64> },
}

/// The oracle's state for one schedule.
#[derive(Debug, Default)]
pub struct Oracle {
    /// Per app: (election, belief).
    pub apps: Vec<(usize, Belief)>,
    /// Per election: the highest term elected.
    terms: Vec<Option<u64>>,
    pub transitions: u64,
    pub checks: u64,
}

impl Oracle {
    pub fn new(elections: usize) -> Self {
        Oracle {
            terms: vec![None; elections],
            ..Default::default()
        }
    }

    pub fn add_app(&mut self, election: usize) -> usize {
        self.apps.push((election, Belief::default()));
        self.apps.len() - 1
    }

    /// Whether `app` leads at `now`.
    pub fn leads(&self, app: usize, now: Duration) -> Option<u64> {
        match self.apps[app].1.lead {
            Some((term, until)) if until.is_none_or(|u| u > now) => Some(term),
            _ => None,
        }
    }

    pub fn stop(&mut self, app: usize) {
        self.apps[app].1.lead = None;
    }

    /// Caps the app's leadership at `until` (jeopardy, or a slow reader's guarantee).
    pub fn cap(&mut self, app: usize, until: Duration) {
        if let Some((_, u)) = &mut self.apps[app].1.lead {
            *u = Some(until);
        }
    }

    /// A leadership begins: returns the violation, if any.
    pub fn start(
        &mut self,
        now: Duration,
        app: usize,
        term: u64,
        until: Option<Duration>,
        how: Start,
    ) -> Result<(), String> {
        self.checks += 1;
        self.transitions += 1;
        let election = self.apps[app].0;
        for other in 0..self.apps.len() {
            if other != app
                && self.apps[other].0 == election
                && let Some(t) = self.leads(other, now)
            {
                return Err(format!(
                    "two leaders in election {election}: app {app} begins term {term} while app {other} leads term {t}"
                ));
            }
        }
        let highest = &mut self.terms[election];
        match how {
            Start::Elected => {
                if highest.is_some_and(|h| term <= h) {
                    return Err(format!(
                        "election {election}: app {app} elected in term {term}, not above {highest:?}"
                    ));
                }
                *highest = Some(term);
            }
            Start::Resumed { claimed } => {
                if claimed != Some(term) {
                    return Err(format!(
                        "election {election}: app {app} resumed in term {term} but claimed {claimed:?}"
                    ));
                }
            }
        }
        self.apps[app].1.lead = Some((term, until));
        Ok(())
    }

    /// Counts a `lost` (for the transition figures).
    pub fn lost(&mut self, app: usize) {
        self.transitions += 1;
        self.stop(app);
    }
}
