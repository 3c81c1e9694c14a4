//! The election state machine of one election on one broker: [`Contender`]. Pure logic, no
//! I/O, driven by explicit instants so it runs under a virtual clock (the safety argument is in
//! the [module docs of `election`](super)).
//!
//! The driver feeds it what it learns (lock observations, read and write results, parties
//! joining and leaving) and asks [`Contender::poll`] what to do next: write the lock, read it,
//! or wait until an instant. What local parties must be told queues up as [`Notification`]s,
//! drained with [`Contender::take_notifications`].
//!
//! The machine is always in one [`Phase`]: ready to decide, needing a read first, or waiting
//! for the one request it has in flight. Each input moves it from one phase to the next.

use std::time::Duration;

use tokio::time::Instant;

use super::lock_state::{LockFailure, LockState, Observed};
use super::record::LeaderRecord;
use super::timing::ElectionTiming;

/// A local party's handle, unique within the broker.
pub type PartyId = u64;

/// Whether a leaving party is told `lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// Tell a leading party `lost` (a `resign` request: the reply follows the event).
    Tell,
    /// The party is gone (its connection closed): tell it nothing.
    Silent,
    /// The broker cut the party's connection (it stopped reading, or sent only bad requests):
    /// its app may live on, leading until its guarantee without having seen `lost`. Nothing
    /// is released or handed over; the lock expires unless the app resumes (see
    /// [`Contender::abandon_candidate`]).
    Abandon,
    /// The party moves to a successor broker (this one was superseded by a rolling upgrade):
    /// as `Abandon`, nothing is written, and a leader is told `jeopardy` with its guarantee,
    /// which the successor confirms (`safe`) when the app resumes there (see
    /// [`Contender::hand_off_candidate`]).
    HandOff,
}

/// Why a local leader stopped leading (the machine's reasons; the wire has a few more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepDown {
    /// The party resigned (or its connection closed).
    Resigned,
    /// No renewal succeeded within the renew deadline.
    RenewFailed,
    /// Someone else wrote the lock, or deleted it; or a resumed claim no longer matched it.
    Preempted,
    /// The broker is shutting down and releases the lock.
    BrokerShutdown,
}

/// Who leads, as shown to local parties.
///
/// A view is only ever built from what the broker read from the lock: none exists before the
/// first read or watch sync. When the lock cannot be read, the view says so (`unknown`) instead
/// of guessing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderView {
    pub leader: Option<String>,
    pub term: Option<u64>,
    /// The local party that leads, if any.
    pub local_leader: Option<PartyId>,
    /// `Some(why)`: the broker cannot tell who leads (the lock could not be read); `leader` is
    /// then `None` and `term` the highest the broker has seen.
    pub unknown: Option<String>,
}

/// What local parties are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// The party leads from now until `valid_until` unless told more (a renewal extends it).
    Elected {
        party: PartyId,
        identity: String,
        term: u64,
        valid_until: Instant,
    },
    /// A resumed claim was confirmed: the party goes on leading in the same term.
    Resumed {
        party: PartyId,
        identity: String,
        term: u64,
        valid_until: Instant,
    },
    /// A renewal succeeded: the leader may act until `valid_until`.
    Renewed {
        party: PartyId,
        term: u64,
        valid_until: Instant,
    },
    Lost {
        party: PartyId,
        identity: String,
        term: u64,
        reason: StepDown,
    },
    /// The broker stops without releasing (a hand-off to its successor): the leader may go on
    /// acting until `valid_until`, by which time a successor must have confirmed it.
    Jeopardy {
        party: PartyId,
        identity: String,
        term: u64,
        valid_until: Instant,
    },
    /// The broker may not act on this lock (a 403, or an Endpoints object that serves a live
    /// Service): every candidate is told once, with why; the machine then retries only
    /// slowly ([`REFUSAL_RETRY`]).
    Refused { refusal: Refusal, message: String },
    /// The leader view changed (sent to every party).
    View(LeaderView),
}

/// Why the broker may not act on a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The API server refused (403): RBAC or the admission policy (the namespace is not
    /// enabled, for one).
    Forbidden,
    /// The object is not a lock: an Endpoints object with subsets (a live Service).
    NotALock,
}

/// How long a refused lock is left alone before the broker tries again (an admin may enable
/// the namespace meanwhile): long enough never to be a hot loop.
pub const REFUSAL_RETRY: Duration = Duration::from_secs(30);

/// What a write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePurpose {
    Acquire,
    Renew,
    /// Renew a record a previous broker wrote, for the party that claims it (same term).
    Adopt,
    Handover,
    Release,
}

/// A write the driver must perform.
#[derive(Debug, Clone, PartialEq)]
pub struct Write<Raw> {
    pub purpose: WritePurpose,
    pub record: LeaderRecord,
    /// Replace this version of this object; `None`: create the object.
    pub base: Option<Observed<Raw>>,
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<Raw> {
    Write(Write<Raw>),
    /// Read the lock object (after a conflict, or when nothing is known yet).
    Read,
    /// Nothing to do until this instant (or until new input, if `None`).
    Wait(Option<Instant>),
}

/// Why a party could not join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("identity {0:?} is already a candidate in this election on this node")]
    IdentityInUse(String),
    #[error(
        "this election already runs with timing {existing:?} on this node; a candidate asked for {requested:?}"
    )]
    TimingMismatch {
        existing: ElectionTiming,
        requested: ElectionTiming,
    },
}

/// A party's claim to go on leading in `term` (after its broker restarted), which the machine
/// confirms against a fresh read of the lock before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub term: u64,
    /// Until when the party goes on acting without confirmation (its last guarantee); a
    /// confirmation that would land later is worthless.
    pub valid_until: Instant,
}

/// A local candidate as it joins: the identity it writes into the lock, its priority among the
/// node's candidates (higher first), the pod it was attested as, and a claim to resume.
///
/// ```
/// use elector_broker::election::Candidacy;
/// let c = Candidacy::new("web-0").priority(5).pod(Some("7d3c…".into()));
/// assert_eq!((c.identity.as_str(), c.priority), ("web-0", 5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidacy {
    pub identity: String,
    pub priority: i32,
    /// The UID of the pod the caller was attested as (attestation on). Written with the record
    /// (the `elector.dev/holder-pod` annotation), and a claim is confirmed only for that same
    /// pod: a pod recreated under the same name is a new candidate, not the old leader.
    pub pod: Option<String>,
    pub claim: Option<Claim>,
}

impl Candidacy {
    pub fn new(identity: impl Into<String>) -> Self {
        Candidacy {
            identity: identity.into(),
            priority: 0,
            pod: None,
            claim: None,
        }
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn pod(mut self, pod: Option<String>) -> Self {
        self.pod = pod;
        self
    }

    pub fn claim(mut self, claim: Option<Claim>) -> Self {
        self.claim = claim;
        self
    }
}

/// Who left before its claim was settled ([`Contender::remove_candidate`]).
#[derive(Debug, Clone)]
struct LeftClaim {
    identity: String,
    term: u64,
    pod: Option<String>,
}

/// The machine's phase: what it waits for before it can decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing in flight; what is known of the lock is current enough to decide on.
    Ready,
    /// Nothing in flight, but the lock must be read before deciding (never read, a conflict,
    /// a watch saying our lock vanished, a claim to confirm).
    MustRead,
    Reading {
        since: Instant,
    },
    Writing {
        since: Instant,
        purpose: WritePurpose,
        party: Option<PartyId>,
        /// Read once it completes (something made the lock as known doubtful meanwhile).
        then_read: bool,
    },
}

/// Consecutive failed requests after which a known view turns `unknown`: one failure is a
/// blip, three in a row (at least two retry periods) mean the lock cannot be read.
const FAILURES_BEFORE_UNKNOWN: u32 = 3;

#[derive(Debug, Clone)]
struct Candidate {
    party: PartyId,
    identity: String,
    priority: i32,
    seq: u64,
    pod: Option<String>,
    claim: Option<Claim>,
}

/// The broker's hold on the lock.
#[derive(Debug, Clone)]
struct Held {
    /// The identity in the record we wrote.
    identity: String,
    term: u64,
    /// When the last successful write was sent.
    last_renew_start: Instant,
    /// The local party that was told `elected` (none between a leader leaving and the handover).
    party: Option<PartyId>,
}

/// One election's contender on one broker.
#[derive(Debug)]
pub struct Contender<Raw> {
    timing: ElectionTiming,
    phase: Phase,
    candidates: Vec<Candidate>,
    next_seq: u64,
    lock: LockState<Raw>,
    /// When the record (or its version) was last seen to change.
    seen_at: Option<Instant>,
    held: Option<Held>,
    highest_term: Option<u64>,
    not_before: Option<Instant>,
    failures: u32,
    /// Why the last request failed, while failures go on.
    last_failure: Option<String>,
    /// The refusal candidates were told of, until a request succeeds.
    refusal_told: Option<(Refusal, String)>,
    /// `None` until the lock was first read (or could not be): nothing is claimed before.
    view: Option<LeaderView>,
    /// The version of the record this machine last wrote: a record naming a local candidate
    /// is this node's leftover (free at once) only if this machine wrote it, so knows that
    /// whoever it named was told `lost`; one a previous broker wrote may name a leader riding
    /// the broker's restart out in jeopardy.
    last_written: Option<String>,
    /// The leadership (identity, term) of a leader that left without being told `lost`
    /// (abandoned or handed off: its app may go on leading until its guarantee): the record
    /// that names it is never this machine's leftover, even if this machine wrote it (a
    /// renewal may even land after the leader left), until that leader resumes here.
    rides_out: Option<(String, u64)>,
    /// A claimant that left (resigned, or closed its connection) before its claim was settled:
    /// the record that still names it, in its term, is released, as it would have been had the
    /// claim been confirmed first.
    left_claim: Option<LeftClaim>,
    notifications: Vec<Notification>,
}

impl<Raw: Clone> Contender<Raw> {
    pub fn new(timing: ElectionTiming) -> Self {
        Contender {
            timing,
            phase: Phase::MustRead,
            candidates: Vec::new(),
            next_seq: 0,
            lock: LockState::Unknown,
            seen_at: None,
            held: None,
            highest_term: None,
            not_before: None,
            failures: 0,
            last_failure: None,
            refusal_told: None,
            view: None,
            last_written: None,
            rides_out: None,
            left_claim: None,
            notifications: Vec::new(),
        }
    }

    pub fn timing(&self) -> ElectionTiming {
        self.timing
    }

    /// The current leader view: `None` until the lock was first read (or a first read failed).
    pub fn view(&self) -> Option<&LeaderView> {
        self.view.as_ref()
    }

    /// Whether the broker holds the lock (for a local party or mid-handover).
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// When the local leader must be told `lost` unless a renewal succeeds first.
    pub fn renew_deadline_at(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| self.deadline_of(h))
    }

    fn deadline_of(&self, held: &Held) -> Instant {
        held.last_renew_start + self.timing.renew_deadline
    }

    pub fn candidate_count(&self) -> usize {
        self.candidates.len()
    }

    /// Whether the machine has nothing left to do: no candidates, nothing held, nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.candidates.is_empty() && self.held.is_none() && !self.in_flight()
    }

    fn in_flight(&self) -> bool {
        matches!(self.phase, Phase::Reading { .. } | Phase::Writing { .. })
    }

    pub fn lock_state(&self) -> &LockState<Raw> {
        &self.lock
    }

    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notifications)
    }

    /// Adds a local candidate, ordered by priority (higher first), then arrival. Refused if the
    /// identity is taken here, or if the candidate asks for other timing than the election
    /// runs with (the first candidate of an election not held sets it). With a `claim`, the
    /// candidate says it led in `claim.term` through a broker that went away: the lock is read
    /// afresh, and the claim is confirmed by a renewal (`Resumed`) only if the record still
    /// names this identity in that term (and, for an attested candidate, its pod), else refused
    /// (`Lost`, reason `Preempted`); either way the candidate then campaigns as usual.
    pub fn join(
        &mut self,
        party: PartyId,
        candidacy: Candidacy,
        timing: Option<ElectionTiming>,
    ) -> Result<(), JoinError> {
        let Candidacy {
            identity,
            priority,
            pod,
            claim,
        } = candidacy;
        if self.has_identity(&identity) {
            return Err(JoinError::IdentityInUse(identity));
        }
        if let Some(t) = timing
            && t != self.timing
        {
            if !self.candidates.is_empty() || self.held.is_some() {
                return Err(JoinError::TimingMismatch {
                    existing: self.timing,
                    requested: t,
                });
            }
            self.timing = t;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.candidates.push(Candidate {
            party,
            identity,
            priority,
            seq,
            pod,
            claim,
        });
        self.candidates
            .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
        if claim.is_some() {
            self.read_before_deciding();
        }
        Ok(())
    }

    /// The refusal in force, if the broker may not act on this lock (a candidate that joins
    /// now is told it too).
    pub fn refusal(&self) -> Option<(Refusal, &str)> {
        self.refusal_told.as_ref().map(|(r, m)| (*r, m.as_str()))
    }

    /// Whether a local candidate already uses this identity.
    pub fn has_identity(&self, identity: &str) -> bool {
        self.candidates.iter().any(|c| c.identity == identity)
    }

    /// Whether `record` (observed as `o`) is this machine's own leftover: it names a local
    /// candidate that does not hold it here and claims nothing, and this machine wrote it (so
    /// whoever it names was told `lost`, or never led). Taken again at once. Any other record
    /// naming a local identity is waited out like a foreign one: a previous broker wrote it,
    /// and the leader it names may ride the restart out in jeopardy, unseen here until it
    /// resumes (while another process campaigns under the same identity).
    fn is_leftover(&self, o: &Observed<Raw>, record: &LeaderRecord) -> bool {
        self.has_identity(&record.holder_identity)
            && !self.claims(&record.holder_identity)
            && self.last_written.as_deref() == Some(o.version.as_str())
            && self.rides_out.as_ref().is_none_or(|(identity, term)| {
                (identity.as_str(), *term) != (record.holder_identity.as_str(), record.leader_transitions)
            })
    }

    /// Whether a local candidate of this identity claims to lead (resumes) and was not yet
    /// confirmed or refused.
    fn claims(&self, identity: &str) -> bool {
        self.candidates
            .iter()
            .any(|c| c.identity == identity && c.claim.is_some())
    }

    /// Makes the next decision wait for a fresh read.
    fn read_before_deciding(&mut self) {
        match &mut self.phase {
            Phase::Ready => self.phase = Phase::MustRead,
            Phase::Writing { then_read, .. } => *then_read = true,
            Phase::MustRead | Phase::Reading { .. } => {}
        }
    }

    /// Removes a local candidate. If it led, it is told `lost` with `reason` (unless
    /// [`Farewell::Silent`]), and the broker hands over to the next local candidate or releases
    /// the lock; with [`Farewell::Abandon`], see [`Self::abandon_candidate`].
    pub fn remove_candidate(&mut self, party: PartyId, reason: StepDown, farewell: Farewell) {
        match farewell {
            Farewell::Abandon => return self.abandon_candidate(party),
            Farewell::HandOff => return self.hand_off_candidate(party),
            Farewell::Tell | Farewell::Silent => {}
        }
        // A leader that resumed and leaves before its claim is settled: it led (in jeopardy)
        // until now, so it is told `lost` like a leader, and its record is released.
        if let Some(c) = self.candidate(party)
            && let Some(claim) = c.claim
        {
            let left = LeftClaim {
                identity: c.identity.clone(),
                term: claim.term,
                pod: c.pod.clone(),
            };
            if farewell == Farewell::Tell {
                self.notifications.push(Notification::Lost {
                    party,
                    identity: left.identity.clone(),
                    term: left.term,
                    reason,
                });
            }
            self.left_claim = Some(left);
        }
        self.candidates.retain(|c| c.party != party);
        if let Some(h) = &mut self.held
            && h.party == Some(party)
        {
            h.party = None;
            if farewell == Farewell::Tell {
                self.notifications.push(Notification::Lost {
                    party,
                    identity: h.identity.clone(),
                    term: h.term,
                    reason,
                });
            }
        }
    }

    /// Removes a local candidate whose app may live on and go on leading until its guarantee
    /// (`last_renew_start + renew_deadline`): the broker cut its connection (the app stopped
    /// reading, or sent nothing but bad requests), so the app never saw a `lost`. If it led,
    /// the lock is neither released nor handed over nor renewed: the record, which names it,
    /// is waited out like anyone else's, from this broker's last write, which is after the
    /// guarantee's start, by the lease duration, which exceeds the renew deadline. So the app's
    /// guarantee ends before anyone, here or elsewhere, can take over. Until then the app may
    /// come back and resume (a claim in the same term).
    pub fn abandon_candidate(&mut self, party: PartyId) {
        self.candidates.retain(|c| c.party != party);
        if let Some(h) = self.held.take_if(|h| h.party == Some(party)) {
            self.rides_out = Some((h.identity, h.term));
        }
    }

    /// Removes a local candidate that moves to a successor broker. If it led, it is told
    /// `Jeopardy` with its guarantee (`last_renew_start + renew_deadline`), and the lock is
    /// left as [`Self::abandon_candidate`] leaves it: not renewed, released nor handed over,
    /// so that the successor's adoption (a compare-and-swap on the record that still names the
    /// party, in the same term) is the next write. A renewal still in flight may land first:
    /// its success is not the party's (it was told `jeopardy` already), and the successor,
    /// whose swap then conflicts, reads again and adopts the renewed record.
    pub fn hand_off_candidate(&mut self, party: PartyId) {
        if let Some(h) = &self.held
            && h.party == Some(party)
        {
            self.notifications.push(Notification::Jeopardy {
                party,
                identity: h.identity.clone(),
                term: h.term,
                valid_until: self.deadline_of(h),
            });
        }
        self.abandon_candidate(party);
    }

    /// Stop and release: the local leader is told `broker_shutdown`, then (see
    /// [`Self::poll`]) the lock is released, as client-go does on shutdown.
    pub fn shut_down(&mut self) {
        let parties: Vec<PartyId> = self.candidates.iter().map(|c| c.party).collect();
        for p in parties {
            self.remove_candidate(p, StepDown::BrokerShutdown, Farewell::Tell);
        }
    }

    /// Stop without releasing, for a successor broker to resume: the local leader is told
    /// `Jeopardy` with its guarantee, and the machine forgets everything (it must not be
    /// polled again). Nothing is written: the record keeps naming the leader until it expires
    /// or the successor renews it.
    pub fn abandon(&mut self) {
        if let Some(h) = self.held.take()
            && let Some(party) = h.party
        {
            self.notifications.push(Notification::Jeopardy {
                party,
                identity: h.identity.clone(),
                term: h.term,
                valid_until: h.last_renew_start + self.timing.renew_deadline,
            });
        }
        self.candidates.clear();
    }

    fn step_down(&mut self, reason: StepDown) {
        if let Some(h) = self.held.take()
            && let Some(party) = h.party
        {
            self.notifications.push(Notification::Lost {
                party,
                identity: h.identity,
                term: h.term,
                reason,
            });
        }
    }

    fn note_term(&mut self, term: u64) {
        self.highest_term = Some(self.highest_term.map_or(term, |t| t.max(term)));
    }

    /// The lock as seen by a watch. A watch's "missing" can be stale (a list taken before our
    /// own create); while holding, it is verified with a read before anything is concluded.
    pub fn observe(&mut self, now: Instant, state: LockState<Raw>) {
        if !matches!(state, LockState::Unknown) {
            // The lock can be read (by the watch), whatever requests do.
            self.last_failure = None;
        }
        if matches!(state, LockState::Missing) && self.held.is_some() {
            self.read_before_deciding();
            return;
        }
        self.apply(now, state);
    }

    fn apply(&mut self, now: Instant, state: LockState<Raw>) {
        match state {
            LockState::Unknown => {}
            LockState::Missing => {
                if !matches!(self.lock, LockState::Missing) {
                    self.seen_at = Some(now);
                }
                self.lock = LockState::Missing;
                // Someone deleted the lock under us: others may create it now.
                self.step_down(StepDown::Preempted);
            }
            LockState::Present(obs) => {
                if let LockState::Present(cur) = &self.lock {
                    if cur.version == obs.version {
                        return;
                    }
                    // An event older than what we already know (e.g. our own write's result
                    // arrived before the watch caught up).
                    if let (Ok(a), Ok(b)) = (cur.version.parse::<u64>(), obs.version.parse::<u64>())
                        && b < a
                    {
                        return;
                    }
                }
                if let Some(r) = &obs.record {
                    self.note_term(r.leader_transitions);
                }
                let holder = obs
                    .record
                    .as_ref()
                    .map(|r| r.holder_identity.as_str())
                    .unwrap_or("");
                if self.held.as_ref().is_some_and(|h| h.identity != holder) {
                    self.step_down(StepDown::Preempted);
                }
                self.seen_at = Some(now);
                self.lock = LockState::Present(obs);
            }
        }
    }

    /// The result of the read asked for by [`Action::Read`].
    pub fn read_done(&mut self, now: Instant, result: Result<LockState<Raw>, LockFailure>) {
        match result {
            Ok(state) => {
                self.phase = Phase::Ready;
                self.succeeded();
                self.apply(now, state);
            }
            Err(f) => {
                self.phase = Phase::MustRead;
                self.backoff(now, f);
            }
        }
    }

    /// The result of the write asked for by [`Action::Write`], sent at `started`.
    pub fn write_done(&mut self, now: Instant, started: Instant, result: Result<Observed<Raw>, LockFailure>) {
        let Phase::Writing {
            purpose,
            party,
            then_read,
            ..
        } = self.phase
        else {
            // Not ours (the driver never sends a result without a write): nothing to apply.
            return;
        };
        self.phase = if then_read { Phase::MustRead } else { Phase::Ready };
        match result {
            Ok(obs) => self.written(now, started, purpose, party, obs),
            Err(LockFailure::Conflict) => self.phase = Phase::MustRead,
            Err(LockFailure::NotFound) => self.apply(now, LockState::Missing),
            Err(
                f @ (LockFailure::Transient { .. }
                | LockFailure::Forbidden { .. }
                | LockFailure::NotALock { .. }),
            ) => self.backoff(now, f),
        }
    }

    fn written(
        &mut self,
        now: Instant,
        started: Instant,
        purpose: WritePurpose,
        party: Option<PartyId>,
        obs: Observed<Raw>,
    ) {
        self.succeeded();
        self.not_before = None;
        let record = obs.record.clone().unwrap_or_default();
        self.note_term(record.leader_transitions);
        self.seen_at = Some(now);
        self.last_written = Some(obs.version.clone());
        self.lock = LockState::Present(obs);
        if purpose == WritePurpose::Release {
            self.held = None;
            self.left_claim = None;
            return;
        }
        if matches!(purpose, WritePurpose::Renew | WritePurpose::Handover) && self.held.is_none() {
            // The leader was told `lost` (deadline) while this write was in flight: its late
            // success does not resurrect that leadership. The record names a local candidate,
            // so the next poll re-acquires, with a new term.
            return;
        }
        let valid_until = started + self.timing.renew_deadline;
        let claim = party.and_then(|p| self.candidate(p)).and_then(|c| c.claim);
        if purpose == WritePurpose::Adopt {
            self.clear_claim(party);
        }
        if now >= valid_until
            || (purpose == WritePurpose::Adopt && claim.is_some_and(|c| now >= c.valid_until))
        {
            // Succeeded too late to count: the deadline passed (and `lost` was sent), or the
            // resuming party gave up waiting. The record names us, so the next poll
            // re-acquires with a new term.
            self.step_down(StepDown::RenewFailed);
            if purpose == WritePurpose::Adopt
                && let Some(p) = party
            {
                self.notifications.push(Notification::Lost {
                    party: p,
                    identity: record.holder_identity.clone(),
                    term: record.leader_transitions,
                    reason: StepDown::RenewFailed,
                });
            }
            return;
        }
        // The write names this party; it leads only if it is still a candidate.
        let still_candidate = party.is_some_and(|p| self.candidate(p).is_some());
        let was_told = self.held.take().and_then(|h| h.party);
        self.held = Some(Held {
            identity: record.holder_identity.clone(),
            term: record.leader_transitions,
            last_renew_start: started,
            party: if still_candidate { party } else { None },
        });
        let Some(p) = party.filter(|_| still_candidate) else {
            return;
        };
        let (identity, term) = (record.holder_identity, record.leader_transitions);
        if purpose == WritePurpose::Adopt {
            // The leader that rode a restart or a move out is back, and confirmed.
            self.rides_out = None;
        }
        self.notifications.push(if purpose == WritePurpose::Adopt {
            Notification::Resumed {
                party: p,
                identity,
                term,
                valid_until,
            }
        } else if was_told != Some(p) {
            Notification::Elected {
                party: p,
                identity,
                term,
                valid_until,
            }
        } else {
            Notification::Renewed {
                party: p,
                term,
                valid_until,
            }
        });
    }

    fn candidate(&self, party: PartyId) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.party == party)
    }

    fn clear_claim(&mut self, party: Option<PartyId>) {
        if let Some(c) = self.candidates.iter_mut().find(|c| Some(c.party) == party) {
            c.claim = None;
        }
    }

    /// A request reached the API server and got an answer that is not a failure.
    fn succeeded(&mut self) {
        self.failures = 0;
        self.last_failure = None;
        self.refusal_told = None;
    }

    fn backoff(&mut self, now: Instant, failure: LockFailure) {
        self.failures = self.failures.saturating_add(1);
        if let LockFailure::Transient { cause, .. }
        | LockFailure::Forbidden { message: cause }
        | LockFailure::NotALock { message: cause } = &failure
        {
            self.last_failure = Some(cause.clone());
        }
        let base = self
            .timing
            .retry_period
            .mul_f64(0.25 * f64::from(1u32 << self.failures.min(4)));
        // Exponential from a quarter of the retry period, capped at it; the server's
        // Retry-After wins when it asks for longer.
        let wait = match &failure {
            LockFailure::Transient {
                retry_after: Some(after),
                ..
            } => (*after).max(base.min(self.timing.retry_period)),
            LockFailure::Forbidden { message } => self.refused(Refusal::Forbidden, message),
            LockFailure::NotALock { message } => self.refused(Refusal::NotALock, message),
            _ => base.min(self.timing.retry_period),
        };
        self.not_before = Some(now + wait);
    }

    /// Tells the candidates of a refusal (once per distinct refusal); returns how long to wait.
    fn refused(&mut self, refusal: Refusal, message: &str) -> Duration {
        if self.refusal_told.as_ref().map(|(_, m)| m.as_str()) != Some(message) && !self.candidates.is_empty()
        {
            self.refusal_told = Some((refusal, message.to_string()));
            self.notifications.push(Notification::Refused {
                refusal,
                message: message.to_string(),
            });
        }
        REFUSAL_RETRY.max(self.timing.retry_period)
    }

    fn make_record(
        &self,
        identity: &str,
        pod: Option<String>,
        now_wall: chrono::DateTime<chrono::Utc>,
        acquire: bool,
    ) -> LeaderRecord {
        let old = match &self.lock {
            LockState::Present(o) => o.record.clone(),
            _ => None,
        };
        let transitions = match (&old, acquire) {
            (Some(r), false) => r.leader_transitions,
            (Some(r), true) => r.leader_transitions + 1,
            // Re-creating a deleted lock: keep terms growing.
            (None, _) => self.highest_term.map_or(0, |t| t + 1),
        };
        LeaderRecord {
            holder_identity: identity.to_string(),
            lease_duration_seconds: self.timing.lease_duration.as_secs() as u32,
            acquire_time: if acquire {
                Some(now_wall)
            } else {
                old.as_ref().and_then(|r| r.acquire_time).or(Some(now_wall))
            },
            renew_time: Some(now_wall),
            leader_transitions: transitions,
            holder_pod: pod,
        }
    }

    /// When the observed record leaves the election free to take.
    fn free_at(&self) -> Option<Instant> {
        match &self.lock {
            LockState::Unknown => None,
            LockState::Missing => self.seen_at,
            LockState::Present(o) => match &o.record {
                None => self.seen_at,
                Some(r) if r.is_released() => self.seen_at,
                Some(r) if self.is_leftover(o, r) => self.seen_at,
                Some(r) => self
                    .seen_at
                    .map(|s| s + Duration::from_secs(u64::from(r.lease_duration_seconds))),
            },
        }
    }

    /// Why the broker cannot tell who leads, if it cannot: the lock was never read and the
    /// first read failed or has gone unanswered for a retry period, or requests have kept
    /// failing. Never while holding: a holder knows it leads until its renew deadline.
    fn unknown_because(&self, now: Instant) -> Option<String> {
        if self.held.is_some() {
            return None;
        }
        let never_read = matches!(self.lock, LockState::Unknown);
        if let Some(cause) = &self.last_failure
            && (never_read || self.failures >= FAILURES_BEFORE_UNKNOWN)
        {
            return Some(format!("the lock cannot be read: {cause}"));
        }
        match self.first_read_patience() {
            Some(at) if now >= at => Some(format!(
                "the lock cannot be read: the Kubernetes API has not answered within {:?}",
                self.timing.retry_period
            )),
            _ => None,
        }
    }

    /// While the very first read is in flight: when to stop waiting quietly and tell parties
    /// that who leads is unknown.
    fn first_read_patience(&self) -> Option<Instant> {
        match (&self.lock, self.phase) {
            (LockState::Unknown, Phase::Reading { since }) => Some(since + self.timing.retry_period),
            _ => None,
        }
    }

    /// While a request is in flight, when the driver must wake anyway: at the renew deadline
    /// (the leader is told `lost` then, not when the request finally fails), and when a first
    /// read has gone unanswered long enough to say so.
    pub fn wake_while_in_flight(&self) -> Option<Instant> {
        // Once parties were told the state is unknown, the first read's patience is spent:
        // waking for it again would spin until the read ends.
        let told_unknown = self.view.as_ref().is_some_and(|v| v.unknown.is_some());
        let patience = self.first_read_patience().filter(|_| !told_unknown);
        earliest(self.renew_deadline_at(), patience)
    }

    fn update_view(&mut self, now: Instant) {
        let view = if let Some(why) = self.unknown_because(now) {
            LeaderView {
                leader: None,
                term: self.highest_term,
                local_leader: None,
                unknown: Some(why),
            }
        } else if matches!(self.lock, LockState::Unknown) {
            // Nothing read yet: claim nothing.
            return;
        } else {
            let (leader, term) = match &self.held {
                Some(h) => (h.party.map(|_| h.identity.clone()), Some(h.term)),
                None => match &self.lock {
                    LockState::Present(o) => match &o.record {
                        Some(r) => {
                            let live = !r.is_released()
                                && !self.is_leftover(o, r)
                                && self.free_at().is_some_and(|f| now < f);
                            (
                                live.then(|| r.holder_identity.clone()),
                                Some(r.leader_transitions),
                            )
                        }
                        None => (None, None),
                    },
                    _ => (None, self.highest_term),
                },
            };
            LeaderView {
                leader,
                term,
                local_leader: self.held.as_ref().and_then(|h| h.party),
                unknown: None,
            }
        };
        if self.view.as_ref() != Some(&view) {
            self.view = Some(view.clone());
            self.notifications.push(Notification::View(view));
        }
    }

    /// Decides the next step at `now` (monotonic) with `now_wall` for the record's timestamps.
    pub fn poll(&mut self, now: Instant, now_wall: chrono::DateTime<chrono::Utc>) -> Action<Raw> {
        let action = self.step(now, now_wall);
        self.update_view(now);
        match &action {
            Action::Read => self.phase = Phase::Reading { since: now },
            Action::Write(w) => {
                self.phase = Phase::Writing {
                    since: now,
                    purpose: w.purpose,
                    party: self.writing_for(w),
                    then_read: false,
                }
            }
            Action::Wait(_) => {}
        }
        action
    }

    /// The local party a write names.
    fn writing_for(&self, w: &Write<Raw>) -> Option<PartyId> {
        match w.purpose {
            WritePurpose::Release => None,
            _ => self
                .candidates
                .iter()
                .find(|c| c.identity == w.record.holder_identity)
                .map(|c| c.party),
        }
    }

    /// One step: what the phase allows, then what the lock and the candidates call for.
    fn step(&mut self, now: Instant, now_wall: chrono::DateTime<chrono::Utc>) -> Action<Raw> {
        // The renew deadline is checked first, even while a request is in flight.
        if let Some(h) = &self.held
            && now >= self.deadline_of(h)
            && !mutation::active(mutation::Mutation::RenewPastDeadline)
        {
            self.step_down(StepDown::RenewFailed);
        }
        let deadline = self.renew_deadline_at();
        if self.in_flight() {
            return Action::Wait(earliest(deadline, self.first_read_patience()));
        }
        if let Some(nb) = self.not_before
            && now < nb
        {
            return Action::Wait(earliest(Some(nb), deadline));
        }
        if self.phase == Phase::MustRead || matches!(self.lock, LockState::Unknown) {
            return Action::Read;
        }
        match self.held.clone() {
            None => self.contend(now, now_wall),
            Some(held) => self.lead(now, now_wall, held),
        }
    }

    fn base(&self) -> Option<Observed<Raw>> {
        match &self.lock {
            LockState::Present(o) => Some(o.clone()),
            _ => None,
        }
    }

    /// Not holding: settle claims, then acquire if the lock is free and someone local wants it.
    fn contend(&mut self, now: Instant, now_wall: chrono::DateTime<chrono::Utc>) -> Action<Raw> {
        if let Some(action) = self.release_left_claim(now_wall) {
            return action;
        }
        if let Some(action) = self.settle_claims(now_wall) {
            return action;
        }
        let Some(first) = self.candidates.first() else {
            return Action::Wait(self.free_at().filter(|f| *f > now));
        };
        let free = mutation::free_by_wall_clock(self, now, now_wall).unwrap_or_else(|| self.free_at());
        match free {
            Some(free) if now >= free => Action::Write(Write {
                purpose: WritePurpose::Acquire,
                record: self.make_record(&first.identity, first.pod.clone(), now_wall, true),
                base: self.base(),
            }),
            other => Action::Wait(other),
        }
    }

    /// Releases the record of a claimant that left unsettled, if it still names it in its term
    /// (judged, like claims, on a fresh read); anything else was written since, and is left.
    fn release_left_claim(&mut self, now_wall: chrono::DateTime<chrono::Utc>) -> Option<Action<Raw>> {
        let left = self.left_claim.as_ref()?;
        let still_names_it = matches!(&self.lock, LockState::Present(o) if o.record.as_ref().is_some_and(|r| {
            r.holder_identity == left.identity
                && r.leader_transitions == left.term
                && (left.pod.is_none() || r.holder_pod == left.pod)
        }));
        if !still_names_it {
            self.left_claim = None;
            return None;
        }
        let mut record = self.make_record("", None, now_wall, false);
        record.lease_duration_seconds = 1;
        Some(Action::Write(Write {
            purpose: WritePurpose::Release,
            record,
            base: self.base(),
        }))
    }

    /// Claims are judged on a fresh read (the phase saw to it): the one that still matches the
    /// record is adopted by a renewal in its term; the others are refused.
    fn settle_claims(&mut self, now_wall: chrono::DateTime<chrono::Utc>) -> Option<Action<Raw>> {
        let record = match &self.lock {
            LockState::Present(o) => o.record.clone(),
            _ => None,
        };
        let mut adopt = None;
        let mut refused = Vec::new();
        for c in self.candidates.iter_mut() {
            let Some(claim) = c.claim else { continue };
            // Under attestation the record must also name the claimant's pod: a pod recreated
            // under the same name (same identity) did not lead.
            let matches = record.as_ref().is_some_and(|r| {
                r.holder_identity == c.identity
                    && (c.pod.is_none() || r.holder_pod == c.pod)
                    && (r.leader_transitions == claim.term
                        || mutation::active(mutation::Mutation::ResumeAnyTerm))
            });
            if matches && adopt.is_none() {
                adopt = Some((c.identity.clone(), c.pod.clone()));
            } else {
                c.claim = None;
                refused.push((c.party, c.identity.clone(), claim.term));
            }
        }
        for (party, identity, term) in refused {
            self.notifications.push(Notification::Lost {
                party,
                identity,
                term,
                reason: StepDown::Preempted,
            });
        }
        let (identity, pod) = adopt?;
        Some(Action::Write(Write {
            purpose: WritePurpose::Adopt,
            record: self.make_record(&identity, pod, now_wall, false),
            base: self.base(),
        }))
    }

    /// Holding: renew for the leader, hand over to the next local candidate, or release.
    fn lead(&mut self, now: Instant, now_wall: chrono::DateTime<chrono::Utc>, held: Held) -> Action<Raw> {
        let base = self.base();
        let desired = match held.party {
            Some(p) if self.candidate(p).is_some() => self.candidate(p).cloned(),
            _ => self.candidates.first().cloned(),
        };
        match desired {
            None => {
                // Nobody local wants it any more: release as client-go does.
                let mut record = self.make_record("", None, now_wall, false);
                record.lease_duration_seconds = 1;
                Action::Write(Write {
                    purpose: WritePurpose::Release,
                    record,
                    base,
                })
            }
            Some(c) if held.party != Some(c.party) => Action::Write(Write {
                // Hand over to the next local candidate in one write.
                purpose: WritePurpose::Handover,
                record: self.make_record(&c.identity, c.pod.clone(), now_wall, true),
                base,
            }),
            Some(c) => {
                let renew_at = held.last_renew_start + self.timing.retry_period;
                if now >= renew_at || base.is_none() {
                    Action::Write(Write {
                        purpose: WritePurpose::Renew,
                        record: self.make_record(&c.identity, c.pod.clone(), now_wall, base.is_none()),
                        base,
                    })
                } else {
                    Action::Wait(earliest(Some(renew_at), self.renew_deadline_at()))
                }
            }
        }
    }
}

/// Deliberate bugs, for the simulator (`elector-tests`, `tests/src/sim/`) to show that its
/// oracle finds them. Compiled only with the `sim-mutations` feature (never in the shipped
/// binaries); without it every check below is a constant `false` / `None`.
#[cfg(any(test, feature = "sim-mutations"))]
pub mod mutation {
    use super::*;
    use std::cell::Cell;

    /// A bug class the simulator must catch.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mutation {
        /// The leader is not told `lost` at its renew deadline; it goes on renewing.
        RenewPastDeadline,
        /// A foreign record expires at its `renewTime + leaseDurationSeconds`, judged against
        /// the local wall clock.
        WallClockExpiry,
        /// A claim is confirmed whatever term the record carries.
        ResumeAnyTerm,
    }

    thread_local! {
        static ACTIVE: Cell<Option<Mutation>> = const { Cell::new(None) };
    }

    /// Turns a mutation on (or all off) for the machines of this thread.
    pub fn set(mutation: Option<Mutation>) {
        ACTIVE.with(|a| a.set(mutation));
    }

    pub(super) fn active(m: Mutation) -> bool {
        ACTIVE.with(|a| a.get() == Some(m))
    }

    pub(super) fn free_by_wall_clock<Raw: Clone>(
        c: &Contender<Raw>,
        now: Instant,
        now_wall: chrono::DateTime<chrono::Utc>,
    ) -> Option<Option<Instant>> {
        if !active(Mutation::WallClockExpiry) {
            return None;
        }
        let LockState::Present(o) = &c.lock else {
            return None;
        };
        let r = o.record.as_ref()?;
        if r.is_released() || c.has_identity(&r.holder_identity) {
            return None;
        }
        let expires = r.renew_time? + chrono::TimeDelta::seconds(i64::from(r.lease_duration_seconds));
        Some(Some(now + (expires - now_wall).to_std().unwrap_or_default()))
    }
}

#[cfg(not(any(test, feature = "sim-mutations")))]
mod mutation {
    use super::*;

    pub(super) enum Mutation {
        RenewPastDeadline,
        ResumeAnyTerm,
    }

    #[inline(always)]
    pub(super) fn active(_: Mutation) -> bool {
        false
    }

    #[inline(always)]
    pub(super) fn free_by_wall_clock<Raw>(
        _: &Contender<Raw>,
        _: Instant,
        _: chrono::DateTime<chrono::Utc>,
    ) -> Option<Option<Instant>> {
        None
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::timing::ElectionTiming;

    type C = Contender<()>;

    fn timing() -> ElectionTiming {
        ElectionTiming::new(
            Duration::from_secs(15),
            Duration::from_secs(10),
            Duration::from_secs(2),
        )
        .unwrap()
    }

    fn wall() -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }

    fn obs(holder: &str, version: u64, transitions: u64) -> LockState<()> {
        LockState::Present(Observed {
            record: Some(LeaderRecord {
                holder_identity: holder.into(),
                lease_duration_seconds: 15,
                acquire_time: None,
                renew_time: None,
                leader_transitions: transitions,
                ..Default::default()
            }),
            version: version.to_string(),
            raw: (),
        })
    }

    /// A machine whose only candidate, party 1 (`a`), created the lock at the returned instant
    /// (version 1, term 0).
    fn elected_alone() -> (C, Instant) {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        let t0 = Instant::now();
        c.write_done(t0, t0, Ok(written(&w, 1)));
        (c, t0)
    }

    fn written(w: &Write<()>, version: u64) -> Observed<()> {
        Observed {
            record: Some(w.record.clone()),
            version: version.to_string(),
            raw: (),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn creates_when_missing_and_renews_each_retry_period() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(
            (w.purpose, w.base.is_none(), w.record.leader_transitions),
            (WritePurpose::Acquire, true, 0)
        );
        let t0 = Instant::now();
        c.write_done(Instant::now(), t0, Ok(written(&w, 1)));
        let n = c.take_notifications();
        assert!(
            matches!(
                &n[..],
                [
                    Notification::View(LeaderView {
                        leader: None,
                        unknown: None,
                        ..
                    }),
                    Notification::Elected {
                        party: 1,
                        term: 0,
                        ..
                    }
                ]
            ),
            "nobody led when the lock was read, then the candidate was elected: {n:?}"
        );
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(t0 + Duration::from_secs(2)))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(w.purpose, WritePurpose::Renew);
        assert_eq!(w.record.leader_transitions, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_leader_is_waited_out_not_released_nor_handed_over() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        c.join(2, Candidacy::new("b"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        c.write_done(Instant::now(), started, Ok(written(&w, 1)));
        let written_at = Instant::now();
        c.abandon_candidate(1);
        // Neither a release nor a handover to `b`: `a` may lead until its guarantee.
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(written_at + Duration::from_secs(15)))
        );
        assert!(written_at + Duration::from_secs(15) > started + timing().renew_deadline);
        tokio::time::advance(Duration::from_secs(15)).await;
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!("b takes over once the record expired")
        };
        assert_eq!(
            (w.purpose, w.record.holder_identity.as_str()),
            (WritePurpose::Acquire, "b")
        );
    }

    /// A leader handed off (or abandoned) may go on leading until its guarantee, unseen here:
    /// a second process campaigning under the same identity at this broker is not handed the
    /// record as this machine's leftover, even though this machine wrote it last (here a
    /// renewal in flight lands after the hand-off). It waits the record out, like a foreign
    /// one, unless the first leader resumes here.
    #[tokio::test(start_paused = true)]
    async fn a_record_naming_a_leader_that_left_in_jeopardy_is_not_a_leftover() {
        for abandon in [false, true] {
            let (mut c, _) = elected_alone();
            tokio::time::advance(Duration::from_secs(2)).await;
            let Action::Write(renew) = c.poll(Instant::now(), wall()) else {
                panic!()
            };
            let sent = Instant::now();
            if abandon {
                c.abandon_candidate(1);
            } else {
                c.remove_candidate(1, StepDown::Resigned, Farewell::HandOff);
            }
            c.write_done(Instant::now(), sent, Ok(written(&renew, 2)));
            let renewed_at = Instant::now();
            c.take_notifications();
            // Another process, same identity, on this node.
            c.join(2, Candidacy::new("a"), None).unwrap();
            assert_eq!(
                c.poll(Instant::now(), wall()),
                Action::Wait(Some(renewed_at + Duration::from_secs(15))),
                "abandon={abandon}: the record is waited out"
            );
            assert!(
                !c.take_notifications()
                    .iter()
                    .any(|n| matches!(n, Notification::Elected { .. }))
            );
            tokio::time::advance(Duration::from_secs(15)).await;
            let Action::Write(w) = c.poll(Instant::now(), wall()) else {
                panic!("abandon={abandon}: taken once expired")
            };
            assert_eq!(
                (
                    w.purpose,
                    w.record.holder_identity.as_str(),
                    w.record.leader_transitions
                ),
                (WritePurpose::Acquire, "a", 1),
                "abandon={abandon}: a new term"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_handed_off_is_told_jeopardy_and_nothing_more_is_written_for_it() {
        let (mut c, t0) = elected_alone();
        c.take_notifications();
        tokio::time::advance(Duration::from_secs(2)).await;
        // A renewal is in flight when the party moves to the successor broker.
        let Action::Write(renew) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        let sent = Instant::now();
        c.take_notifications();
        c.remove_candidate(1, StepDown::Resigned, Farewell::HandOff);
        let n = c.take_notifications();
        assert!(
            matches!(
                n.as_slice(),
                [Notification::Jeopardy { party: 1, term: 0, valid_until, .. }]
                    if *valid_until == t0 + timing().renew_deadline
            ),
            "told jeopardy with the guarantee of the last successful write: {n:?}"
        );
        assert!(!c.holds());
        // The renewal lands: not the party's any more, and it is told nothing.
        tokio::time::advance(Duration::from_millis(5)).await;
        c.write_done(Instant::now(), sent, Ok(written(&renew, 2)));
        assert_eq!(
            c.take_notifications()
                .iter()
                .filter(|n| !matches!(n, Notification::View(_)))
                .count(),
            0
        );
        // Nobody local is left: nothing is released (the successor adopts the record).
        assert!(matches!(c.poll(Instant::now(), wall()), Action::Wait(_)));
    }

    /// The record as an attesting broker wrote it for pod `uid-1`, holder `a` in term 4.
    fn attested_obs(version: u64) -> LockState<()> {
        let LockState::Present(mut o) = obs("a", version, 4) else {
            unreachable!()
        };
        o.record.as_mut().unwrap().holder_pod = Some("uid-1".into());
        LockState::Present(o)
    }

    #[tokio::test(start_paused = true)]
    async fn an_attested_claim_is_confirmed_only_for_the_pod_that_led() {
        let claim = Some(Claim {
            term: 4,
            valid_until: Instant::now() + Duration::from_secs(5),
        });
        // A pod recreated under the same name (same identity, same term claimed): its claim is
        // refused; it then campaigns as usual, and takes the lock in a new term once the record
        // (a previous broker's, naming the old pod, which may still ride a broker restart out
        // in jeopardy) is waited out like a foreign one.
        let mut c = C::new(timing());
        c.join(
            1,
            Candidacy::new("a").pod(Some("uid-2".into())).claim(claim),
            None,
        )
        .unwrap();
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        let seen = Instant::now();
        c.read_done(seen, Ok(attested_obs(7)));
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(seen + Duration::from_secs(15)))
        );
        tokio::time::advance(Duration::from_secs(15)).await;
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!("campaigns")
        };
        assert_eq!(
            (
                w.purpose,
                w.record.leader_transitions,
                w.record.holder_pod.as_deref()
            ),
            (WritePurpose::Acquire, 5, Some("uid-2")),
            "a new term, never the old pod's"
        );
        assert!(
            c.take_notifications().iter().any(|n| matches!(
                n,
                Notification::Lost {
                    party: 1,
                    term: 4,
                    reason: StepDown::Preempted,
                    ..
                }
            )),
            "the impostor is told lost"
        );

        // The pod that led: adopted by a renewal that names it again.
        let mut c = C::new(timing());
        c.join(
            1,
            Candidacy::new("a").pod(Some("uid-1".into())).claim(claim),
            None,
        )
        .unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(attested_obs(7)));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!("adopt")
        };
        assert_eq!(w.purpose, WritePurpose::Adopt);
        assert_eq!(
            (w.record.leader_transitions, w.record.holder_pod.as_deref()),
            (4, Some("uid-1"))
        );

        // An unattested broker (no pod known) judges by identity and term, as before.
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a").claim(claim), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(attested_obs(7)));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!("adopt")
        };
        assert_eq!((w.purpose, w.record.holder_pod), (WritePurpose::Adopt, None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_resuming_is_shown_as_leading_until_confirmed() {
        // A fresh broker reads a record naming `a`, whose app resumes (a claim): until the
        // claim is settled the view names `a` (it leads, in jeopardy), never "nobody".
        let mut c = C::new(timing());
        let claim = Claim {
            term: 4,
            valid_until: Instant::now() + Duration::from_secs(5),
        };
        c.join(1, Candidacy::new("a").claim(Some(claim)), None).unwrap();
        c.join(2, Candidacy::new("b"), None).unwrap();
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        c.read_done(Instant::now(), Ok(obs("a", 7, 4)));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!("adopts")
        };
        assert_eq!(w.purpose, WritePurpose::Adopt);
        let n = c.take_notifications();
        assert!(
            matches!(n.as_slice(), [Notification::View(LeaderView { leader: Some(l), term: Some(4), .. })] if l == "a"),
            "{n:?}"
        );
        // Without a claim, another campaign under that identity (a second process of the same
        // app, while the leader is still on its way from the old broker) is not elected at
        // once: the record, which this machine did not write, is waited out like a foreign
        // one, and `a` is shown leading meanwhile.
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        let seen = Instant::now();
        c.read_done(seen, Ok(obs("a", 7, 4)));
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(seen + Duration::from_secs(15)))
        );
        let n = c.take_notifications();
        assert!(
            matches!(n.as_slice(), [Notification::View(LeaderView { leader: Some(l), .. })] if l == "a"),
            "{n:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claimant_that_leaves_before_its_claim_is_settled_is_released() {
        let claim = Claim {
            term: 4,
            valid_until: Instant::now() + Duration::from_secs(5),
        };
        for farewell in [Farewell::Tell, Farewell::Silent] {
            let mut c = C::new(timing());
            c.join(1, Candidacy::new("a").claim(Some(claim)), None).unwrap();
            assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
            // The app resigns (or its connection closes) while the read is in flight.
            c.remove_candidate(1, StepDown::Resigned, farewell);
            let told = c.take_notifications().into_iter().any(|n| {
                matches!(
                    n,
                    Notification::Lost {
                        party: 1,
                        term: 4,
                        reason: StepDown::Resigned,
                        ..
                    }
                )
            });
            assert_eq!(
                told,
                farewell == Farewell::Tell,
                "a resign is answered with lost, like a leader's"
            );
            c.read_done(Instant::now(), Ok(obs("a", 7, 4)));
            let Action::Write(w) = c.poll(Instant::now(), wall()) else {
                panic!("releases at once ({farewell:?})")
            };
            assert_eq!(
                (
                    w.purpose,
                    w.record.holder_identity.as_str(),
                    w.base.as_ref().map(|b| b.version.clone())
                ),
                (WritePurpose::Release, "", Some("7".to_string()))
            );
            c.write_done(Instant::now(), Instant::now(), Ok(written(&w, 8)));
            assert!(
                matches!(c.poll(Instant::now(), wall()), Action::Wait(_)),
                "then nothing"
            );
        }
        // A record written meanwhile by someone else is left alone.
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a").claim(Some(claim)), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.remove_candidate(1, StepDown::Resigned, Farewell::Silent);
        c.read_done(Instant::now(), Ok(obs("b", 9, 5)));
        assert!(matches!(c.poll(Instant::now(), wall()), Action::Wait(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn foreign_holder_is_waited_out_from_when_seen() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(obs("other", 5, 3)));
        let seen = Instant::now();
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(seen + Duration::from_secs(15)))
        );
        assert_eq!(c.view().unwrap().leader.as_deref(), Some("other"));
        tokio::time::advance(Duration::from_secs(10)).await;
        // A renewal by the holder pushes expiry out again.
        c.observe(Instant::now(), obs("other", 6, 3));
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(matches!(c.poll(Instant::now(), wall()), Action::Wait(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!("expired")
        };
        assert_eq!(
            (w.purpose, w.record.leader_transitions),
            (WritePurpose::Acquire, 4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn released_record_is_taken_at_once_and_conflict_rereads() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(obs("", 5, 3)));
        let Action::Write(_) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        c.write_done(Instant::now(), Instant::now(), Err(LockFailure::Conflict));
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        c.read_done(Instant::now(), Ok(obs("b", 6, 4)));
        assert!(
            c.take_notifications()
                .iter()
                .all(|n| !matches!(n, Notification::Elected { .. }))
        );
        assert!(matches!(c.poll(Instant::now(), wall()), Action::Wait(Some(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn leader_is_told_lost_at_the_renew_deadline_even_with_a_write_in_flight() {
        let (mut c, t0) = elected_alone();
        c.take_notifications();
        tokio::time::advance(Duration::from_secs(2)).await;
        let Action::Write(_) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        // The renewal hangs; the deadline is what the driver waits for.
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(t0 + Duration::from_secs(10)))
        );
        tokio::time::advance(Duration::from_secs(8)).await;
        let _ = c.poll(Instant::now(), wall());
        let n = c.take_notifications();
        assert!(
            n.iter().any(|n| matches!(
                n,
                Notification::Lost {
                    reason: StepDown::RenewFailed,
                    ..
                }
            )),
            "{n:?}"
        );
        assert!(!c.holds());
        // Lost strictly before anyone else could take over (t0 + lease duration).
        assert!(Instant::now() < t0 + Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_lands_after_lost_does_not_resurrect_the_same_term() {
        let (mut c, t0) = elected_alone();
        tokio::time::advance(Duration::from_secs(9)).await;
        let Action::Write(renew) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        let sent = Instant::now();
        assert_eq!(c.renew_deadline_at(), Some(t0 + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(2)).await;
        let _ = c.poll(Instant::now(), wall());
        c.take_notifications();
        assert!(!c.holds(), "told lost at the deadline");
        // The hanging renewal succeeds now: no `elected` with the old term.
        c.write_done(Instant::now(), sent, Ok(written(&renew, 2)));
        assert!(
            c.take_notifications()
                .iter()
                .all(|n| !matches!(n, Notification::Elected { .. }))
        );
        let Action::Write(again) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(
            (again.purpose, again.record.leader_transitions),
            (WritePurpose::Acquire, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn handover_in_one_write_then_release() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        c.join(2, Candidacy::new("b"), None).unwrap();
        c.join(3, Candidacy::new("c").priority(5), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(w.record.holder_identity, "c", "highest priority first");
        c.write_done(Instant::now(), Instant::now(), Ok(written(&w, 1)));
        c.join(4, Candidacy::new("d").priority(9), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        assert_eq!(
            c.view().unwrap().leader.as_deref(),
            Some("c"),
            "a higher priority never preempts a live leader"
        );
        c.take_notifications();
        c.remove_candidate(3, StepDown::Resigned, Farewell::Tell);
        let n = c.take_notifications();
        assert!(matches!(
            &n[0],
            Notification::Lost {
                party: 3,
                reason: StepDown::Resigned,
                ..
            }
        ));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(
            (
                w.purpose,
                w.record.holder_identity.as_str(),
                w.record.leader_transitions
            ),
            (WritePurpose::Handover, "d", 1)
        );
        c.write_done(Instant::now(), Instant::now(), Ok(written(&w, 2)));
        assert!(c.take_notifications().iter().any(|n| matches!(
            n,
            Notification::Elected {
                party: 4,
                term: 1,
                ..
            }
        )));
        for p in [1, 2, 4] {
            c.remove_candidate(p, StepDown::Resigned, Farewell::Silent);
        }
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(
            (
                w.purpose,
                w.record.holder_identity.as_str(),
                w.record.lease_duration_seconds
            ),
            (WritePurpose::Release, "", 1)
        );
        assert_eq!(
            w.record.leader_transitions, 1,
            "release keeps the term, as client-go does"
        );
        c.write_done(Instant::now(), Instant::now(), Ok(written(&w, 3)));
        assert!(c.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn foreign_write_preempts_at_once() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        c.write_done(Instant::now(), Instant::now(), Ok(written(&w, 1)));
        c.take_notifications();
        c.observe(Instant::now(), obs("intruder", 2, 1));
        let n = c.take_notifications();
        assert!(matches!(
            n[0],
            Notification::Lost {
                reason: StepDown::Preempted,
                ..
            }
        ));
        // A stale echo of our own older write is ignored.
        c.observe(Instant::now(), obs("a", 1, 0));
        assert!(matches!(c.lock_state(), LockState::Present(o) if o.version == "2"));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_claimed_before_the_lock_is_read() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        assert_eq!(c.view(), None);
        assert!(c.take_notifications().is_empty(), "no view before the read");
        c.read_done(Instant::now(), Ok(obs("b", 5, 2)));
        let _ = c.poll(Instant::now(), wall());
        assert_eq!(c.view().unwrap().leader.as_deref(), Some("b"));
        assert!(matches!(
            &c.take_notifications()[..],
            [Notification::View(LeaderView { leader: Some(l), term: Some(2), .. })] if l == "b"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_lock_is_unknown_not_free() {
        // The first read fails: parties are told why, not that nobody leads.
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Err(LockFailure::transient("connection refused")));
        let _ = c.poll(Instant::now(), wall());
        let v = c.view().unwrap();
        assert_eq!(v.leader, None);
        assert!(
            v.unknown.as_deref().unwrap().contains("connection refused"),
            "{v:?}"
        );
        // Once it can be read, the view is real.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        c.read_done(Instant::now(), Ok(obs("b", 5, 2)));
        let _ = c.poll(Instant::now(), wall());
        assert_eq!(c.view().unwrap().unknown, None);
        assert_eq!(c.view().unwrap().leader.as_deref(), Some("b"));

        // A first read that hangs: unknown after a retry period, while it is still in flight.
        let mut c = C::new(timing());
        assert_eq!(c.poll(Instant::now(), wall()), Action::Read);
        let patience = Instant::now() + Duration::from_secs(2);
        assert_eq!(c.wake_while_in_flight(), Some(patience));
        tokio::time::advance(Duration::from_secs(2)).await;
        let _ = c.poll(Instant::now(), wall());
        assert!(
            c.view()
                .unwrap()
                .unknown
                .as_deref()
                .unwrap()
                .contains("not answered")
        );
        assert_eq!(
            c.wake_while_in_flight(),
            None,
            "told once: no more wake-ups for it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_honours_retry_after() {
        let mut c = C::new(timing());
        c.join(1, Candidacy::new("a"), None).unwrap();
        let _ = c.poll(Instant::now(), wall());
        c.read_done(
            Instant::now(),
            Err(LockFailure::Transient {
                retry_after: Some(Duration::from_secs(7)),
                cause: "429".into(),
            }),
        );
        assert_eq!(
            c.poll(Instant::now(), wall()),
            Action::Wait(Some(Instant::now() + Duration::from_secs(7)))
        );
    }
}
