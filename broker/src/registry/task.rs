//! The task of one election: owns its [`Contender`], does its I/O, and tells its parties.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    CandidateInfo, Command, CommandReceiver, ElectionInfo, Elections, JoinError, LeaderNotice, PartyEvent,
    PartySink, ShutdownMode,
};
use crate::election::machine::{Action, WritePurpose};
use crate::election::{
    Contender, LeaderView, LockFailure, LockState, Notification, PartyId, Refusal, StepDown,
};
use crate::lock::{LockObject, RawObject};
use crate::metrics::Metrics;
use elector_client::protocol::{ElectionName, ErrorCode, LostReason};

/// The wire's code for a refusal.
fn refusal_code(r: Refusal) -> ErrorCode {
    match r {
        Refusal::Forbidden => ErrorCode::ApiForbidden,
        Refusal::NotALock => ErrorCode::NotALock,
    }
}

/// The wire's reason for a step-down.
pub(super) fn lost_reason(s: StepDown) -> LostReason {
    match s {
        StepDown::Resigned => LostReason::Resigned,
        StepDown::RenewFailed => LostReason::RenewFailed,
        StepDown::Preempted => LostReason::Preempted,
        StepDown::BrokerShutdown => LostReason::BrokerShutdown,
    }
}

struct Party {
    sink: Arc<dyn PartySink>,
    candidate: Option<(String, i32)>,
}

type Pending = BoxFuture<'static, PendingResult>;

enum PendingResult {
    Write {
        sent: Instant,
        /// The wall-clock send time of a renewal or acquisition (`None` for a release).
        renewal_sent: Option<SystemTime>,
        result: Result<LockObject, LockFailure>,
    },
    Read(Result<LockState<RawObject>, LockFailure>),
}

pub(super) struct ElectionTask {
    elections: Elections,
    name: ElectionName,
    commands: CommandReceiver,
    done: watch::Sender<bool>,
    machine: Contender<RawObject>,
    parties: HashMap<PartyId, Party>,
    lock_rx: watch::Receiver<LockState<RawObject>>,
    held_counted: bool,
    shutting_down: bool,
    /// Handed off: write nothing more, exit at once.
    abandoned: bool,
    last_renew_wall: Option<SystemTime>,
}

impl ElectionTask {
    pub(super) fn new(
        elections: Elections,
        name: ElectionName,
        commands: CommandReceiver,
        done: watch::Sender<bool>,
    ) -> Self {
        let mut lock_rx = elections
            .inner
            .hub
            .subscribe(name.lock, &name.namespace, &name.election);
        lock_rx.mark_changed();
        ElectionTask {
            machine: Contender::new(elections.inner.defaults.timing),
            elections,
            name,
            commands,
            done,
            parties: HashMap::new(),
            lock_rx,
            held_counted: false,
            shutting_down: false,
            abandoned: false,
            last_renew_wall: None,
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.elections.inner.metrics
    }

    fn deliver(&mut self) {
        // Metrics first: whoever is told `elected` or `lost` must find them up to date.
        let holds = self.machine.holds();
        if holds != self.held_counted {
            self.held_counted = holds;
            if holds {
                self.metrics().elections_held.inc();
            } else {
                self.metrics().elections_held.dec();
            }
        }
        for n in self.machine.take_notifications() {
            match n {
                Notification::View(v) => {
                    if let Some(why) = &v.unknown {
                        tracing::warn!(election = %self.name, api = %self.elections.inner.backends.location, "who leads is unknown: {why}");
                    }
                    let notice = Arc::new(LeaderNotice::of_view(self.name.clone(), &v));
                    let leader = self.destination_of(v.local_leader);
                    for p in self.parties.values() {
                        p.sink.deliver(
                            &self.name,
                            PartyEvent::Leader {
                                notice: notice.clone(),
                                is_me: leader == Some(p.sink.destination()),
                            },
                        );
                    }
                }
                Notification::Elected {
                    party,
                    identity,
                    term,
                    valid_until,
                } => {
                    self.metrics().leadership_transitions.inc();
                    tracing::info!(election = %self.name, %identity, term, "elected");
                    self.kube_event(&identity, term, crate::events::Change::Elected);
                    self.tell(
                        party,
                        PartyEvent::Elected {
                            identity,
                            term,
                            valid_until,
                        },
                    );
                }
                Notification::Renewed {
                    party,
                    term,
                    valid_until,
                } => {
                    let identity = self.identity_of(party);
                    self.tell(
                        party,
                        PartyEvent::Renewed {
                            identity,
                            term,
                            valid_until,
                        },
                    );
                }
                Notification::Resumed {
                    party,
                    identity,
                    term,
                    valid_until,
                } => {
                    tracing::info!(election = %self.name, %identity, term, "resumed a leadership");
                    self.tell(
                        party,
                        PartyEvent::Resumed {
                            identity,
                            term,
                            valid_until,
                        },
                    );
                }
                Notification::Lost {
                    party,
                    identity,
                    term,
                    reason,
                } => {
                    let reason = lost_reason(reason);
                    tracing::info!(election = %self.name, %identity, term, %reason, "lost");
                    self.kube_event(&identity, term, crate::events::Change::of_lost(reason));
                    self.tell(
                        party,
                        PartyEvent::Lost {
                            identity,
                            term,
                            reason,
                        },
                    );
                }
                Notification::Refused { refusal, message } => {
                    let code = refusal_code(refusal);
                    tracing::warn!(election = %self.name, %code, "the broker may not act on this lock: {message}");
                    self.metrics().rejected(code.as_str());
                    for p in self.parties.values().filter(|p| p.candidate.is_some()) {
                        p.sink.deliver(
                            &self.name,
                            PartyEvent::Refused {
                                code,
                                message: message.clone(),
                            },
                        );
                    }
                }
                Notification::Jeopardy {
                    party,
                    identity,
                    term,
                    valid_until,
                } => {
                    tracing::info!(election = %self.name, %identity, term, "handing off a leadership");
                    self.tell(
                        party,
                        PartyEvent::Jeopardy {
                            identity,
                            term,
                            valid_until,
                        },
                    );
                }
            }
        }
    }

    /// Hands a leadership change to the Kubernetes Events recorder, if any (never waits).
    fn kube_event(&self, identity: &str, term: u64, change: crate::events::Change) {
        if let Some(events) = &self.elections.inner.backends.events {
            events.leadership_changed(&self.name, self.machine.lock_state(), identity, term, change);
        }
    }

    fn tell(&self, party: PartyId, event: PartyEvent) {
        if let Some(p) = self.parties.get(&party) {
            p.sink.deliver(&self.name, event);
        }
    }

    fn identity_of(&self, party: PartyId) -> String {
        self.parties
            .get(&party)
            .and_then(|p| p.candidate.as_ref())
            .map(|(identity, _)| identity.clone())
            .unwrap_or_default()
    }

    /// The destination of a local leader's party.
    fn destination_of(&self, local_leader: Option<PartyId>) -> Option<usize> {
        self.parties.get(&local_leader?).map(|p| p.sink.destination())
    }

    /// Tells a joining party who leads now, if the lock has been read (otherwise the party
    /// hears it with everyone else once it has).
    fn tell_current_leader(&self, sink: &dyn PartySink) {
        let Some(v) = self.machine.view() else { return };
        let notice = Arc::new(LeaderNotice::of_view(self.name.clone(), v));
        let is_me = self.destination_of(v.local_leader) == Some(sink.destination());
        sink.deliver(&self.name, PartyEvent::Leader { notice, is_me });
    }

    fn start(&mut self, action: Action<RawObject>) -> (Option<Pending>, Option<Instant>) {
        let backend = self.elections.inner.backends.for_kind(self.name.lock).clone();
        let limit = self.machine.timing().renew_deadline;
        let ns = self.name.namespace.clone();
        let name = self.name.election.clone();
        match action {
            Action::Wait(until) => (None, until),
            Action::Read => {
                let fut = backend.get(&ns, &name);
                let pending = async move {
                    let r = tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
                        Err(LockFailure::transient(format!("no answer within {limit:?}")))
                    });
                    PendingResult::Read(r)
                }
                .boxed();
                (Some(pending), None)
            }
            Action::Write(w) => {
                let started = Instant::now();
                let renewal_sent =
                    matches!(w.purpose, WritePurpose::Renew | WritePurpose::Acquire).then(SystemTime::now);
                let fut = match &w.base {
                    Some(base) => backend.replace(&ns, &name, base, &w.record),
                    None => backend.create(&ns, &name, &w.record),
                };
                let pending = async move {
                    let r = tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
                        Err(LockFailure::transient(format!("no answer within {limit:?}")))
                    });
                    PendingResult::Write {
                        sent: started,
                        renewal_sent,
                        result: r,
                    }
                }
                .boxed();
                (Some(pending), None)
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Campaign {
                party,
                candidacy,
                timing,
                sink,
                reply,
            } => {
                if self.shutting_down {
                    let _ = reply.send(Err(JoinError::ShuttingDown));
                    return;
                }
                let (identity, priority) = (candidacy.identity.clone(), candidacy.priority);
                if let Err(e) = self.machine.join(party, candidacy, timing) {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
                self.metrics().candidates.inc();
                self.tell_current_leader(sink.as_ref());
                if let Some((refusal, message)) = self.machine.refusal() {
                    let code = refusal_code(refusal);
                    self.metrics().rejected(code.as_str());
                    sink.deliver(
                        &self.name,
                        PartyEvent::Refused {
                            code,
                            message: message.to_string(),
                        },
                    );
                }
                self.parties.insert(
                    party,
                    Party {
                        sink,
                        candidate: Some((identity, priority)),
                    },
                );
                let _ = reply.send(Ok(()));
            }
            Command::Observe { party, sink } => {
                self.metrics().observers.inc();
                self.tell_current_leader(sink.as_ref());
                self.parties.insert(
                    party,
                    Party {
                        sink,
                        candidate: None,
                    },
                );
            }
            Command::Leave {
                party,
                reason,
                farewell,
                reply,
            } => {
                if let Some(p) = self.parties.get(&party) {
                    if p.candidate.is_some() {
                        self.machine.remove_candidate(party, reason, farewell);
                        self.metrics().candidates.dec();
                    } else {
                        self.metrics().observers.dec();
                    }
                    // Deliver `lost` while the party's sink is still known.
                    self.deliver();
                    self.parties.remove(&party);
                }
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            Command::Info(reply) => {
                let _ = reply.send(self.info());
            }
            Command::Shutdown(mode) => {
                self.shutting_down = true;
                match mode {
                    ShutdownMode::Release => self.machine.shut_down(),
                    ShutdownMode::Handoff => {
                        self.machine.abandon();
                        self.abandoned = true;
                    }
                }
                self.deliver();
                let candidates = self.parties.values().filter(|p| p.candidate.is_some()).count();
                self.metrics().candidates.dec_by(candidates as i64);
                self.metrics()
                    .observers
                    .dec_by((self.parties.len() - candidates) as i64);
                self.parties.clear();
            }
        }
    }

    fn info(&self) -> ElectionInfo {
        let unknown = LeaderView::default();
        let view = self.machine.view().unwrap_or(&unknown);
        let timing = self.machine.timing();
        let mut candidates: Vec<CandidateInfo> = self
            .parties
            .iter()
            .filter_map(|(id, p)| {
                p.candidate.as_ref().map(|(identity, priority)| CandidateInfo {
                    identity: identity.clone(),
                    priority: *priority,
                    is_leader: view.local_leader == Some(*id),
                })
            })
            .collect();
        candidates.sort_by(|a, b| a.identity.cmp(&b.identity));
        ElectionInfo {
            name: self.name.clone(),
            leader: view.leader.clone(),
            term: view.term,
            held_by_this_broker: self.machine.holds(),
            candidates,
            observers: self.parties.values().filter(|p| p.candidate.is_none()).count(),
            last_renew: self
                .machine
                .holds()
                .then_some(self.last_renew_wall)
                .flatten()
                .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
            lease_duration_seconds: timing.lease_duration.as_secs(),
            renew_deadline_seconds: timing.renew_deadline.as_secs_f64(),
            retry_period_seconds: timing.retry_period.as_secs_f64(),
        }
    }

    /// Exits if nothing is left to do, unregistering under the map's lock so no command is lost.
    fn try_exit(&mut self) -> bool {
        if !self.parties.is_empty() || !self.machine.is_idle() {
            return false;
        }
        let map = self.elections.map();
        if !self.commands.is_empty() {
            return false;
        }
        self.unregister(map);
        true
    }

    fn unregister(&self, mut map: std::sync::MutexGuard<'_, HashMap<ElectionName, super::Handle>>) {
        map.remove(&self.name);
        self.elections.inner.metrics.elections.set(map.len() as i64);
        drop(map);
        self.elections
            .inner
            .hub
            .unsubscribe(self.name.lock, &self.name.namespace, &self.name.election);
    }

    pub(super) async fn run(mut self) {
        let mut pending: Option<Pending> = None;
        loop {
            if self.abandoned {
                self.unregister(self.elections.map());
                break;
            }
            let wall = chrono::Utc::now() + self.elections.inner.defaults.wall_clock_skew;
            let action = self.machine.poll(Instant::now(), wall);
            match &action {
                Action::Write(w) => tracing::debug!(election = %self.name, purpose = ?w.purpose,
                    holder = %w.record.holder_identity, base = ?w.base.as_ref().map(|b| &b.version), "write"),
                Action::Read => tracing::debug!(election = %self.name, "read"),
                Action::Wait(_) => {}
            }
            self.deliver();
            let (started, mut wait_until) = self.start(action);
            if started.is_some() {
                pending = started;
            }
            if pending.is_some() {
                // While a request is in flight, still wake at the renew deadline: the leader is
                // told `lost` then, not when the request finally fails.
                wait_until = self.machine.wake_while_in_flight();
            }
            if pending.is_none() && self.try_exit() {
                break;
            }
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.handle(*cmd),
                    None => break,
                },
                result = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    pending = None;
                    let now = Instant::now();
                    match result {
                        PendingResult::Write { sent, renewal_sent, result: r } => {
                            tracing::debug!(election = %self.name, ok = r.is_ok(), result = ?r.as_ref().map(|o| &o.version).map_err(|e| e.clone()),
                                sent_ago = ?now - sent, "write done");
                            if r.is_ok() && renewal_sent.is_some() {
                                // As the leader's guarantee: counted from when the write that
                                // succeeded was sent.
                                self.last_renew_wall = renewal_sent;
                            }
                            self.machine.write_done(now, sent, r)
                        }
                        PendingResult::Read(r) => self.machine.read_done(now, r),
                    }
                }
                changed = self.lock_rx.changed() => {
                    if changed.is_ok() {
                        let state = self.lock_rx.borrow_and_update().clone();
                        if let LockState::Present(o) = &state {
                            tracing::debug!(election = %self.name, version = %o.version,
                                holder = ?o.record.as_ref().map(|r| &r.holder_identity), "watch");
                        }
                        self.machine.observe(Instant::now(), state);
                    }
                }
                _ = sleep_until_opt(wait_until) => {}
            }
        }
        if self.held_counted {
            self.metrics().elections_held.dec();
        }
        let _ = self.done.send(true);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}
