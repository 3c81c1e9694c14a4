//! The election state machine of one election on one broker: pure logic, no I/O, driven by
//! explicit instants so it runs under a virtual clock.
//!
//! The driver feeds it what it learns (lock observations, write results, candidates joining and
//! leaving) and asks [`Contender::poll`] what to do next: write the lock, read it, or wait until
//! an instant. Notifications for local parties (`elected`, `lost`, leader changes) queue up in
//! the machine and are drained with [`Contender::take_notifications`].
//!
//! # Why there are never two leaders
//! - A foreign holder is live until `seen_at + leaseDurationSeconds`, where `seen_at` is when
//!   this broker last saw the record (or its version) change, on the local monotonic clock.
//! - The local leader is told `lost` as soon as `last_renew_start + renew_deadline` passes
//!   without a successful renewal, where `last_renew_start` is when the last successful write
//!   was *sent*. Any other broker saw that write change the record no earlier than it was sent,
//!   so it cannot take over before `last_renew_start + lease_duration`, which is later than
//!   our deadline because `lease_duration > renew_deadline` is enforced.
//! - Every acquisition is a compare-and-swap on the version last seen: of two contenders only
//!   one write can succeed.
//! - Seeing the record change to another holder, or the object deleted, ends local leadership
//!   at once.

use std::time::Duration;

use tokio::time::Instant;

use super::record::LeaderRecord;
use elector_client::protocol::LostReason;

/// Election timing. Invariant (checked by [`ElectionTiming::new`]):
/// `lease_duration > renew_deadline > 1.2 × retry_period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ElectionTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// Why a timing was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("lease_duration must be a whole number of seconds from 1 to 86400, got {0:?}")]
    LeaseDuration(Duration),
    #[error("renew_deadline ({renew_deadline:?}) must be shorter than lease_duration ({lease_duration:?})")]
    RenewDeadlineTooLong {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
    #[error("renew_deadline ({renew_deadline:?}) must be longer than 1.2 × retry_period ({retry_period:?})")]
    RetryPeriodTooLong {
        renew_deadline: Duration,
        retry_period: Duration,
    },
    #[error("retry_period must be at least 10ms, got {0:?}")]
    RetryPeriodTooShort(Duration),
}

impl ElectionTiming {
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, TimingError> {
        if lease_duration.subsec_nanos() != 0
            || lease_duration.as_secs() == 0
            || lease_duration.as_secs() > 86_400
        {
            return Err(TimingError::LeaseDuration(lease_duration));
        }
        if renew_deadline >= lease_duration {
            return Err(TimingError::RenewDeadlineTooLong {
                renew_deadline,
                lease_duration,
            });
        }
        if retry_period < Duration::from_millis(10) {
            return Err(TimingError::RetryPeriodTooShort(retry_period));
        }
        if renew_deadline.as_secs_f64() <= 1.2 * retry_period.as_secs_f64() {
            return Err(TimingError::RetryPeriodTooLong {
                renew_deadline,
                retry_period,
            });
        }
        Ok(ElectionTiming {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

impl Default for ElectionTiming {
    /// client-go's customary 15 s / 10 s / 2 s.
    fn default() -> Self {
        ElectionTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A local party's handle, unique within the broker.
pub type PartyId = u64;

/// A lock object as last read: its record (if it has a parseable one) and version.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed<Raw> {
    pub record: Option<LeaderRecord>,
    /// The object's `resourceVersion`: the compare-and-swap token.
    pub version: String,
    /// The whole object, so a replace keeps everything else it carries.
    pub raw: Raw,
}

/// What the lock looks like to the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum LockState<Raw> {
    /// Not read yet.
    Unknown,
    /// The object does not exist.
    Missing,
    Present(Observed<Raw>),
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
    Elected {
        party: PartyId,
        identity: String,
        term: u64,
    },
    Lost {
        party: PartyId,
        identity: String,
        term: u64,
        reason: LostReason,
    },
    /// The leader view changed (sent to every party).
    View(LeaderView),
}

/// What a write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePurpose {
    Acquire,
    Renew,
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

/// How a write or read failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockFailure {
    /// Someone else wrote first (409 Conflict / AlreadyExists).
    Conflict,
    /// The object is gone (404 on replace).
    NotFound,
    /// Anything else: server errors, throttling (with the server's `Retry-After`), timeouts.
    Transient {
        retry_after: Option<Duration>,
        /// What went wrong, for people (logs, and the `unknown` of a leader view).
        cause: String,
    },
}

impl LockFailure {
    /// A transient failure without a `Retry-After`.
    pub fn transient(cause: impl Into<String>) -> Self {
        LockFailure::Transient {
            retry_after: None,
            cause: cause.into(),
        }
    }
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
    candidates: Vec<Candidate>,
    next_seq: u64,
    lock: LockState<Raw>,
    /// When the record (or its version) was last seen to change.
    seen_at: Option<Instant>,
    held: Option<Held>,
    highest_term: Option<u64>,
    need_read: bool,
    /// A write or read is in flight; decide nothing new until its result arrives.
    in_flight: bool,
    in_flight_purpose: Option<(WritePurpose, Option<PartyId>)>,
    not_before: Option<Instant>,
    failures: u32,
    /// Why the last request failed, while failures go on.
    last_failure: Option<String>,
    /// When the request in flight was sent.
    in_flight_since: Option<Instant>,
    shutting_down: bool,
    /// `None` until the lock was first read (or could not be): nothing is claimed before.
    view: Option<LeaderView>,
    notifications: Vec<Notification>,
}

impl<Raw: Clone> Contender<Raw> {
    pub fn new(timing: ElectionTiming) -> Self {
        Contender {
            timing,
            candidates: Vec::new(),
            next_seq: 0,
            lock: LockState::Unknown,
            seen_at: None,
            held: None,
            highest_term: None,
            need_read: false,
            in_flight: false,
            in_flight_purpose: None,
            not_before: None,
            failures: 0,
            last_failure: None,
            in_flight_since: None,
            shutting_down: false,
            view: None,
            notifications: Vec::new(),
        }
    }

    pub fn timing(&self) -> ElectionTiming {
        self.timing
    }

    /// Changes the timing; only takes effect for later decisions (used when the first candidate
    /// of an observed election brings its own timing).
    pub fn set_timing(&mut self, timing: ElectionTiming) {
        self.timing = timing;
    }

    /// The current leader view: `None` until the lock was first read (or a first read failed).
    pub fn view(&self) -> Option<&LeaderView> {
        self.view.as_ref()
    }

    /// Whether the broker holds the lock (for a local party or mid-handover).
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    /// When the local leader must be told `lost` unless a renewal succeeds first: the driver
    /// must wake by then even while a write is in flight.
    pub fn renew_deadline_at(&self) -> Option<Instant> {
        self.held
            .as_ref()
            .map(|h| h.last_renew_start + self.timing.renew_deadline)
    }

    pub fn candidate_count(&self) -> usize {
        self.candidates.len()
    }

    /// Whether the machine has nothing left to do: no candidates, nothing held, nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.candidates.is_empty() && self.held.is_none() && !self.in_flight
    }

    pub fn lock_state(&self) -> &LockState<Raw> {
        &self.lock
    }

    pub fn take_notifications(&mut self) -> Vec<Notification> {
        std::mem::take(&mut self.notifications)
    }

    /// Adds a local candidate. Ordered by priority (higher first), then arrival.
    pub fn add_candidate(&mut self, party: PartyId, identity: String, priority: i32) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.candidates.push(Candidate {
            party,
            identity,
            priority,
            seq,
        });
        self.candidates
            .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
    }

    /// Whether a local candidate already uses this identity.
    pub fn has_identity(&self, identity: &str) -> bool {
        self.candidates.iter().any(|c| c.identity == identity)
    }

    /// Removes a local candidate. If it led, it is told `lost` with `reason` (when `notify`),
    /// and the broker hands over to the next local candidate or releases the lock.
    pub fn remove_candidate(&mut self, party: PartyId, reason: LostReason, notify: bool) {
        self.candidates.retain(|c| c.party != party);
        if let Some(h) = &mut self.held
            && h.party == Some(party)
        {
            h.party = None;
            if notify {
                self.notifications.push(Notification::Lost {
                    party,
                    identity: h.identity.clone(),
                    term: h.term,
                    reason,
                });
            }
        }
    }

    /// Stop: tell the local leader `broker_shutdown` and release the lock (see [`Self::poll`]).
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
        let parties: Vec<PartyId> = self.candidates.iter().map(|c| c.party).collect();
        for p in parties {
            self.remove_candidate(p, LostReason::BrokerShutdown, true);
        }
    }

    fn step_down(&mut self, reason: LostReason) {
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
            self.need_read = true;
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
                self.step_down(LostReason::Preempted);
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
                    self.step_down(LostReason::Preempted);
                }
                self.seen_at = Some(now);
                self.lock = LockState::Present(obs);
            }
        }
    }

    /// The result of the read asked for by [`Action::Read`].
    pub fn read_done(&mut self, now: Instant, result: Result<LockState<Raw>, LockFailure>) {
        self.in_flight = false;
        self.in_flight_since = None;
        self.in_flight_purpose = None;
        match result {
            Ok(state) => {
                self.need_read = false;
                self.succeeded();
                self.apply(now, state);
            }
            Err(f) => self.backoff(now, f),
        }
    }

    /// The result of the write asked for by [`Action::Write`], sent at `started`.
    pub fn write_done(&mut self, now: Instant, started: Instant, result: Result<Observed<Raw>, LockFailure>) {
        self.in_flight = false;
        self.in_flight_since = None;
        let (purpose, party) = self
            .in_flight_purpose
            .take()
            .unwrap_or((WritePurpose::Renew, None));
        match result {
            Ok(obs) => {
                self.succeeded();
                self.not_before = None;
                let record = obs.record.clone().unwrap_or_else(|| LeaderRecord {
                    holder_identity: String::new(),
                    lease_duration_seconds: 0,
                    acquire_time: None,
                    renew_time: None,
                    leader_transitions: 0,
                });
                self.note_term(record.leader_transitions);
                self.seen_at = Some(now);
                self.lock = LockState::Present(obs);
                if purpose == WritePurpose::Release {
                    self.held = None;
                    return;
                }
                if matches!(purpose, WritePurpose::Renew | WritePurpose::Handover) && self.held.is_none() {
                    // The leader was told `lost` (deadline) while this write was in flight: its
                    // late success does not resurrect that leadership. The record names a local
                    // candidate, so the next poll re-acquires, with a new term.
                    return;
                }
                if now >= started + self.timing.renew_deadline {
                    // Succeeded too late to count: the deadline passed (and `lost` was sent).
                    // The record names us, so the next poll re-acquires with a new term.
                    self.step_down(LostReason::RenewFailed);
                    return;
                }
                // The write names this party; it leads only if it is still a candidate and the
                // deadline did not pass meanwhile.
                let still_candidate = party.is_some_and(|p| self.candidates.iter().any(|c| c.party == p));
                let previous = self.held.take();
                let was_told = previous.as_ref().and_then(|h| h.party);
                self.held = Some(Held {
                    identity: record.holder_identity.clone(),
                    term: record.leader_transitions,
                    last_renew_start: started,
                    party: if still_candidate { party } else { None },
                });
                if still_candidate && was_told != party {
                    self.notifications.push(Notification::Elected {
                        party: party.expect("still_candidate implies Some"),
                        identity: record.holder_identity,
                        term: record.leader_transitions,
                    });
                }
            }
            Err(LockFailure::Conflict) => {
                self.need_read = true;
            }
            Err(LockFailure::NotFound) => {
                self.apply(now, LockState::Missing);
            }
            Err(f @ LockFailure::Transient { .. }) => self.backoff(now, f),
        }
    }

    /// A request reached the API server and got an answer that is not a failure.
    fn succeeded(&mut self) {
        self.failures = 0;
        self.last_failure = None;
    }

    fn backoff(&mut self, now: Instant, failure: LockFailure) {
        self.failures = self.failures.saturating_add(1);
        if let LockFailure::Transient { cause, .. } = &failure {
            self.last_failure = Some(cause.clone());
        }
        let base = self
            .timing
            .retry_period
            .mul_f64(0.25 * f64::from(1u32 << self.failures.min(4)));
        // Exponential from a quarter of the retry period, capped at it; the server's
        // Retry-After wins when it asks for longer.
        let wait = match failure {
            LockFailure::Transient {
                retry_after: Some(after),
                ..
            } => after.max(base.min(self.timing.retry_period)),
            _ => base.min(self.timing.retry_period),
        };
        self.not_before = Some(now + wait);
    }

    fn make_record(
        &self,
        identity: &str,
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
        }
    }

    /// Whether the observed record leaves the election free to take at `now`.
    fn free_at(&self) -> Option<Instant> {
        match &self.lock {
            LockState::Unknown => None,
            LockState::Missing => self.seen_at,
            LockState::Present(o) => match &o.record {
                None => self.seen_at,
                Some(r) if r.is_released() => self.seen_at,
                Some(r) if self.has_identity(&r.holder_identity) => self.seen_at,
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
        match (&self.lock, self.in_flight_since) {
            (LockState::Unknown, Some(since)) if self.in_flight => Some(since + self.timing.retry_period),
            _ => None,
        }
    }

    /// While a request is in flight, when the driver must wake anyway: at the renew deadline
    /// (the leader is told `lost` then, not when the request finally fails), and when a first
    /// read has gone unanswered long enough to say so.
    pub fn wake_while_in_flight(&self) -> Option<Instant> {
        match (self.renew_deadline_at(), self.first_read_patience()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn update_view(&mut self, now: Instant) {
        if let Some(why) = self.unknown_because(now) {
            let view = LeaderView {
                leader: None,
                term: self.highest_term,
                local_leader: None,
                unknown: Some(why),
            };
            if self.view.as_ref() != Some(&view) {
                self.view = Some(view.clone());
                self.notifications.push(Notification::View(view));
            }
            return;
        }
        if matches!(self.lock, LockState::Unknown) {
            // Nothing read yet: claim nothing.
            return;
        }
        let (leader, term) = match &self.held {
            Some(h) => (h.party.map(|_| h.identity.clone()), Some(h.term)),
            None => match &self.lock {
                LockState::Present(o) => match &o.record {
                    Some(r) => {
                        let live = !r.is_released()
                            && !self.has_identity(&r.holder_identity)
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
        let view = LeaderView {
            leader,
            term,
            local_leader: self.held.as_ref().and_then(|h| h.party),
            unknown: None,
        };
        if self.view.as_ref() != Some(&view) {
            self.view = Some(view.clone());
            self.notifications.push(Notification::View(view));
        }
    }

    /// Decides the next step at `now` (monotonic) with `now_wall` for the record's timestamps.
    pub fn poll(&mut self, now: Instant, now_wall: chrono::DateTime<chrono::Utc>) -> Action<Raw> {
        let action = self.decide(now, now_wall);
        self.update_view(now);
        if matches!(action, Action::Write(_) | Action::Read) {
            self.in_flight = true;
            self.in_flight_since = Some(now);
        }
        action
    }

    fn decide(&mut self, now: Instant, now_wall: chrono::DateTime<chrono::Utc>) -> Action<Raw> {
        // The renew deadline is checked first, even while a write is in flight.
        if let Some(h) = &self.held
            && now >= h.last_renew_start + self.timing.renew_deadline
        {
            self.step_down(LostReason::RenewFailed);
        }
        let deadline = self
            .held
            .as_ref()
            .map(|h| h.last_renew_start + self.timing.renew_deadline);
        if self.in_flight {
            return Action::Wait(deadline);
        }
        let earliest = |t: Option<Instant>| match (t, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(nb) = self.not_before
            && now < nb
        {
            return Action::Wait(earliest(Some(nb)));
        }
        if self.need_read || matches!(self.lock, LockState::Unknown) {
            self.in_flight_purpose = None;
            return Action::Read;
        }
        let base = match &self.lock {
            LockState::Present(o) => Some(o.clone()),
            _ => None,
        };

        let Some(held) = self.held.clone() else {
            // Not holding: acquire if free and someone local wants it.
            if self.shutting_down {
                return Action::Wait(None);
            }
            let Some(first) = self.candidates.first().cloned() else {
                return Action::Wait(self.free_at().filter(|f| *f > now));
            };
            return match self.free_at() {
                Some(free) if now >= free => {
                    self.in_flight_purpose = Some((WritePurpose::Acquire, Some(first.party)));
                    Action::Write(Write {
                        purpose: WritePurpose::Acquire,
                        record: self.make_record(&first.identity, now_wall, true),
                        base,
                    })
                }
                other => Action::Wait(other),
            };
        };

        let desired = match held.party {
            Some(p) if self.candidates.iter().any(|c| c.party == p) => {
                self.candidates.iter().find(|c| c.party == p).cloned()
            }
            _ => self.candidates.first().cloned(),
        };
        match desired {
            None => {
                // Nobody local wants it any more: release as client-go does.
                self.in_flight_purpose = Some((WritePurpose::Release, None));
                let mut record = self.make_record("", now_wall, false);
                record.lease_duration_seconds = 1;
                Action::Write(Write {
                    purpose: WritePurpose::Release,
                    record,
                    base,
                })
            }
            Some(c) if held.party != Some(c.party) => {
                // Hand over to the next local candidate in one write.
                self.in_flight_purpose = Some((WritePurpose::Handover, Some(c.party)));
                Action::Write(Write {
                    purpose: WritePurpose::Handover,
                    record: self.make_record(&c.identity, now_wall, true),
                    base,
                })
            }
            Some(c) => {
                let renew_at = held.last_renew_start + self.timing.retry_period;
                if now >= renew_at || base.is_none() {
                    self.in_flight_purpose = Some((WritePurpose::Renew, Some(c.party)));
                    Action::Write(Write {
                        purpose: WritePurpose::Renew,
                        record: self.make_record(&c.identity, now_wall, base.is_none()),
                        base,
                    })
                } else {
                    Action::Wait(earliest(Some(renew_at)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            }),
            version: version.to_string(),
            raw: (),
        })
    }

    fn written(w: &Write<()>, version: u64) -> Observed<()> {
        Observed {
            record: Some(w.record.clone()),
            version: version.to_string(),
            raw: (),
        }
    }

    #[test]
    fn timing_invariants() {
        assert!(
            ElectionTiming::new(
                Duration::from_secs(10),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
            .is_err()
        );
        assert!(
            ElectionTiming::new(
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(9)
            )
            .is_err()
        );
        assert!(
            ElectionTiming::new(
                Duration::from_millis(1500),
                Duration::from_secs(1),
                Duration::from_millis(100)
            )
            .is_err()
        );
        assert!(
            ElectionTiming::new(
                Duration::from_secs(1),
                Duration::from_millis(600),
                Duration::from_millis(200)
            )
            .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn creates_when_missing_and_renews_each_retry_period() {
        let mut c = C::new(timing());
        c.add_candidate(1, "a".into(), 0);
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
    async fn foreign_holder_is_waited_out_from_when_seen() {
        let mut c = C::new(timing());
        c.add_candidate(1, "a".into(), 0);
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
        c.add_candidate(1, "a".into(), 0);
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
        let mut c = C::new(timing());
        c.add_candidate(1, "a".into(), 0);
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        let t0 = Instant::now();
        c.write_done(t0, t0, Ok(written(&w, 1)));
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
                    reason: LostReason::RenewFailed,
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
        let mut c = C::new(timing());
        c.add_candidate(1, "a".into(), 0);
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        let t0 = Instant::now();
        c.write_done(t0, t0, Ok(written(&w, 1)));
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
        c.add_candidate(1, "a".into(), 0);
        c.add_candidate(2, "b".into(), 0);
        c.add_candidate(3, "c".into(), 5);
        let _ = c.poll(Instant::now(), wall());
        c.read_done(Instant::now(), Ok(LockState::Missing));
        let Action::Write(w) = c.poll(Instant::now(), wall()) else {
            panic!()
        };
        assert_eq!(w.record.holder_identity, "c", "highest priority first");
        c.write_done(Instant::now(), Instant::now(), Ok(written(&w, 1)));
        c.add_candidate(4, "d".into(), 9);
        let _ = c.poll(Instant::now(), wall());
        assert_eq!(
            c.view().unwrap().leader.as_deref(),
            Some("c"),
            "a higher priority never preempts a live leader"
        );
        c.take_notifications();
        c.remove_candidate(3, LostReason::Resigned, true);
        let n = c.take_notifications();
        assert!(matches!(
            &n[0],
            Notification::Lost {
                party: 3,
                reason: LostReason::Resigned,
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
            c.remove_candidate(p, LostReason::Resigned, false);
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
        c.add_candidate(1, "a".into(), 0);
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
                reason: LostReason::Preempted,
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
        c.add_candidate(1, "a".into(), 0);
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
        c.add_candidate(1, "a".into(), 0);
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
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_honours_retry_after() {
        let mut c = C::new(timing());
        c.add_candidate(1, "a".into(), 0);
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
