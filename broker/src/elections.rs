//! The broker's elections: one task per election that any local party takes part in, created on
//! first interest and torn down (watch closed, memory freed) when the last party leaves.
//!
//! Each task owns an [`election::machine::Contender`](crate::election::machine::Contender) and
//! does its I/O: lock writes and reads (bounded by the renew deadline), lock observations from
//! the [`WatchHub`], and commands from the socket layer. Parties receive [`PartyEvent`]s through
//! a [`PartySink`]; delivery is a non-blocking enqueue, so a slow client never stalls an election.
//!
//! ```no_run
//! # async fn demo() -> Result<(), elector_broker::elections::JoinError> {
//! use elector_broker::elections::{Elections, Defaults};
//! use elector_broker::lock::Backends;
//! let elections = Elections::new(Backends::memory(), Defaults::default(), None);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::election::machine::{
    Action, Contender, ElectionTiming, LeaderView, LockFailure, LockState, Notification, PartyId,
    WritePurpose,
};
use crate::lock::hub::WatchHub;
use crate::lock::{Backends, LockObject, RawObject};
use crate::metrics::Metrics;
use bytes::Bytes;
use elector_client::protocol::{ElectionName, Event, LeaderEvent, LostReason};

/// Who leads an election, as of one change: shared by every party told of that change (one
/// allocation per change, however many parties), and encoded for the wire at most twice (as
/// its own leader's party sees it, and as everyone else does), not once per party.
#[derive(Debug)]
pub struct LeaderNotice {
    pub name: ElectionName,
    pub leader: Option<String>,
    pub term: Option<u64>,
    /// `Some(why)`: the broker cannot tell who leads.
    pub unknown: Option<String>,
    lines: [OnceLock<Bytes>; 2],
}

impl LeaderNotice {
    pub fn new(name: ElectionName, leader: Option<String>, term: Option<u64>) -> Self {
        LeaderNotice {
            name,
            leader,
            term,
            unknown: None,
            lines: Default::default(),
        }
    }

    /// The notice of a leader view.
    pub fn of_view(name: ElectionName, view: &LeaderView) -> Self {
        LeaderNotice {
            unknown: view.unknown.clone(),
            ..LeaderNotice::new(name, view.leader.clone(), view.term)
        }
    }

    /// The `leader` event, for a party that is (`is_me`) or is not the leader.
    pub fn event(&self, is_me: bool) -> LeaderEvent {
        LeaderEvent {
            name: self.name.clone(),
            leader: self.leader.clone(),
            term: self.term,
            is_me,
            unknown: self.unknown.clone(),
        }
    }

    /// The `leader` event as a protocol line, encoded on first use.
    pub fn line(&self, is_me: bool) -> Bytes {
        self.lines[usize::from(is_me)]
            .get_or_init(|| Event::Leader(self.event(is_me)).to_line().into())
            .clone()
    }
}

/// What a local party is told about an election.
#[derive(Debug, Clone)]
pub enum PartyEvent {
    Leader {
        notice: Arc<LeaderNotice>,
        is_me: bool,
    },
    Elected {
        identity: String,
        term: u64,
    },
    Lost {
        identity: String,
        term: u64,
        reason: LostReason,
    },
}

/// Where a party's events go. `deliver` must not block.
pub trait PartySink: Send + Sync + std::fmt::Debug {
    fn deliver(&self, election: &ElectionName, event: PartyEvent);

    /// Where events end up (one connection): parties with the same destination are one
    /// audience, so `is_me` is true for all of them while any of them leads (a connection
    /// that campaigns in an election and also observes it is told the same thing twice).
    fn destination(&self) -> usize;
}

/// Why joining an election failed.
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
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// Broker-wide settings of elections.
#[derive(Debug, Clone, Copy, Default)]
pub struct Defaults {
    /// Timing of an election whose first candidate asks for none.
    pub timing: ElectionTiming,
    /// Added to this broker's wall clock for the timestamps it writes into lock records
    /// (`acquireTime`, `renewTime`). Zero in production. Tests skew brokers apart with it to
    /// show that no decision depends on wall clocks agreeing: expiry is judged on each broker's
    /// monotonic clock from when it saw a record change.
    pub wall_clock_skew: chrono::TimeDelta,
}

impl From<ElectionTiming> for Defaults {
    fn from(timing: ElectionTiming) -> Self {
        Defaults {
            timing,
            ..Defaults::default()
        }
    }
}

/// One election as shown on `/elections`.
#[derive(Debug, Clone, Serialize)]
pub struct ElectionInfo {
    #[serde(flatten)]
    pub name: ElectionName,
    pub leader: Option<String>,
    pub term: Option<u64>,
    pub held_by_this_broker: bool,
    pub candidates: Vec<CandidateInfo>,
    pub observers: usize,
    /// Wall-clock time of the last successful renewal, while this broker holds the lock.
    pub last_renew: Option<String>,
    pub lease_duration_seconds: u64,
    pub renew_deadline_seconds: f64,
    pub retry_period_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateInfo {
    pub identity: String,
    pub priority: i32,
    pub is_leader: bool,
}

enum Command {
    Campaign {
        party: PartyId,
        identity: String,
        priority: i32,
        timing: Option<ElectionTiming>,
        sink: Arc<dyn PartySink>,
        reply: oneshot::Sender<Result<(), JoinError>>,
    },
    Observe {
        party: PartyId,
        sink: Arc<dyn PartySink>,
    },
    Leave {
        party: PartyId,
        reason: LostReason,
        notify: bool,
        reply: Option<oneshot::Sender<()>>,
    },
    Info(oneshot::Sender<ElectionInfo>),
    Shutdown,
}

/// Commands travel boxed: an unbounded channel allocates its slots 32 at a time when it is
/// created, so 32 boxes (256 bytes) instead of 32 commands (3.5 KiB) per election.
type CommandSender = mpsc::UnboundedSender<Box<Command>>;
type CommandReceiver = mpsc::UnboundedReceiver<Box<Command>>;

#[derive(Debug)]
struct Handle {
    commands: CommandSender,
    done: watch::Receiver<bool>,
}

/// All elections of one broker.
#[derive(Debug, Clone)]
pub struct Elections {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backends: Backends,
    hub: WatchHub,
    defaults: Defaults,
    metrics: Arc<Metrics>,
    next_party: AtomicU64,
    elections: Mutex<HashMap<ElectionName, Handle>>,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Elections {
    pub fn new(backends: Backends, defaults: Defaults, metrics: Option<Arc<Metrics>>) -> Self {
        Elections {
            inner: Arc::new(Inner {
                hub: WatchHub::new(backends.clone()),
                backends,
                defaults,
                metrics: metrics.unwrap_or_default(),
                next_party: AtomicU64::new(1),
                elections: Mutex::new(HashMap::new()),
                shutting_down: false.into(),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn defaults(&self) -> Defaults {
        self.inner.defaults
    }

    /// How many namespace watches are open (for tests and metrics).
    pub fn open_watches(&self) -> usize {
        self.inner.hub.open_watches()
    }

    /// How many elections have a running task.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ElectionName, Handle>> {
        self.inner.elections.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn new_party(&self) -> PartyId {
        self.inner.next_party.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a command to an election's task, starting the task if needed. Done under the map's
    /// lock, so a task that is deciding to exit cannot miss it.
    fn send(&self, name: &ElectionName, cmd: Command) {
        let cmd = Box::new(cmd);
        let mut map = self.map();
        let cmd = match map.get(name) {
            Some(h) => match h.commands.send(cmd) {
                Ok(()) => return,
                Err(mpsc::error::SendError(cmd)) => cmd,
            },
            None => cmd,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(false);
        let _ = tx.send(cmd);
        map.insert(
            name.clone(),
            Handle {
                commands: tx,
                done: done_rx,
            },
        );
        self.inner.metrics.elections.set(map.len() as i64);
        let task = ElectionTask::new(self.clone(), name.clone(), rx, done_tx);
        tokio::spawn(task.run());
    }

    /// Adds a candidate. Its events (a `leader` event at once, later `elected` / `lost`) go to
    /// `sink`. `timing` applies when the election has no candidates yet.
    pub async fn campaign(
        &self,
        name: &ElectionName,
        party: PartyId,
        identity: String,
        priority: i32,
        timing: Option<ElectionTiming>,
        sink: Arc<dyn PartySink>,
    ) -> Result<(), JoinError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(JoinError::ShuttingDown);
        }
        let (reply, rx) = oneshot::channel();
        self.send(
            name,
            Command::Campaign {
                party,
                identity,
                priority,
                timing,
                sink,
                reply,
            },
        );
        rx.await.unwrap_or(Err(JoinError::ShuttingDown))
    }

    /// Adds an observer: it gets every `leader` event of the election.
    pub fn observe(&self, name: &ElectionName, party: PartyId, sink: Arc<dyn PartySink>) {
        self.send(name, Command::Observe { party, sink });
    }

    /// Removes a party (candidate or observer). A leading candidate is told `lost` with `reason`
    /// when `notify`; the lock is handed over or released. Returns once done.
    pub async fn leave(&self, name: &ElectionName, party: PartyId, reason: LostReason, notify: bool) {
        let (reply, rx) = oneshot::channel();
        let sent = {
            let map = self.map();
            map.get(name).is_some_and(|h| {
                h.commands
                    .send(Box::new(Command::Leave {
                        party,
                        reason,
                        notify,
                        reply: Some(reply),
                    }))
                    .is_ok()
            })
        };
        if sent {
            let _ = rx.await;
        }
    }

    /// Removes a party without waiting (for connection teardown).
    pub fn leave_nowait(&self, name: &ElectionName, party: PartyId, reason: LostReason, notify: bool) {
        if let Some(h) = self.map().get(name) {
            let _ = h.commands.send(Box::new(Command::Leave {
                party,
                reason,
                notify,
                reply: None,
            }));
        }
    }

    /// Every election's state.
    pub async fn info(&self) -> Vec<ElectionInfo> {
        let receivers: Vec<_> = {
            let map = self.map();
            map.values()
                .filter_map(|h| {
                    let (tx, rx) = oneshot::channel();
                    h.commands.send(Box::new(Command::Info(tx))).ok().map(|_| rx)
                })
                .collect()
        };
        let mut out = Vec::new();
        for rx in receivers {
            if let Ok(i) = rx.await {
                out.push(i);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Tells every local leader `broker_shutdown`, releases every held lock, and waits (up to
    /// `grace`) for all elections to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let mut dones = Vec::new();
        {
            let map = self.map();
            for h in map.values() {
                let _ = h.commands.send(Box::new(Command::Shutdown));
                dones.push(h.done.clone());
            }
        }
        let all = async {
            for mut d in dones {
                let _ = d.wait_for(|done| *done).await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("some elections did not release their locks within {grace:?}");
        }
    }
}

struct Party {
    sink: Arc<dyn PartySink>,
    candidate: Option<(String, i32)>,
}

type Pending = BoxFuture<'static, PendingResult>;

enum PendingResult {
    Write(Instant, Result<LockObject, LockFailure>),
    Read(Result<LockState<RawObject>, LockFailure>),
}

struct ElectionTask {
    elections: Elections,
    name: ElectionName,
    commands: CommandReceiver,
    done: watch::Sender<bool>,
    machine: Contender<RawObject>,
    parties: HashMap<PartyId, Party>,
    lock_rx: watch::Receiver<LockState<RawObject>>,
    held_counted: bool,
    shutting_down: bool,
    last_renew_wall: Option<SystemTime>,
}

impl ElectionTask {
    fn new(
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
                } => {
                    self.metrics().leadership_transitions.inc();
                    tracing::info!(election = %self.name, %identity, term, "elected");
                    if let Some(p) = self.parties.get(&party) {
                        p.sink.deliver(&self.name, PartyEvent::Elected { identity, term });
                    }
                }
                Notification::Lost {
                    party,
                    identity,
                    term,
                    reason,
                } => {
                    tracing::info!(election = %self.name, %identity, term, %reason, "lost");
                    if let Some(p) = self.parties.get(&party) {
                        p.sink.deliver(
                            &self.name,
                            PartyEvent::Lost {
                                identity,
                                term,
                                reason,
                            },
                        );
                    }
                }
            }
        }
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
                if w.purpose == WritePurpose::Renew || w.purpose == WritePurpose::Acquire {
                    self.last_renew_wall = Some(SystemTime::now());
                }
                let fut = match &w.base {
                    Some(base) => backend.replace(&ns, &name, base, &w.record),
                    None => backend.create(&ns, &name, &w.record),
                };
                let pending = async move {
                    let r = tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
                        Err(LockFailure::transient(format!("no answer within {limit:?}")))
                    });
                    PendingResult::Write(started, r)
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
                identity,
                priority,
                timing,
                sink,
                reply,
            } => {
                if self.shutting_down {
                    let _ = reply.send(Err(JoinError::ShuttingDown));
                    return;
                }
                if self.machine.has_identity(&identity) {
                    let _ = reply.send(Err(JoinError::IdentityInUse(identity)));
                    return;
                }
                if let Some(t) = timing
                    && t != self.machine.timing()
                {
                    if self.machine.candidate_count() == 0 && !self.machine.holds() {
                        self.machine.set_timing(t);
                    } else {
                        let _ = reply.send(Err(JoinError::TimingMismatch {
                            existing: self.machine.timing(),
                            requested: t,
                        }));
                        return;
                    }
                }
                self.machine.add_candidate(party, identity.clone(), priority);
                self.metrics().candidates.inc();
                self.tell_current_leader(sink.as_ref());
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
                notify,
                reply,
            } => {
                if let Some(p) = self.parties.get(&party) {
                    if p.candidate.is_some() {
                        self.machine.remove_candidate(party, reason, notify);
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
            Command::Shutdown => {
                self.shutting_down = true;
                self.machine.shut_down();
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
        let mut map = self.elections.map();
        if !self.commands.is_empty() {
            return false;
        }
        map.remove(&self.name);
        self.elections.inner.metrics.elections.set(map.len() as i64);
        drop(map);
        self.elections
            .inner
            .hub
            .unsubscribe(self.name.lock, &self.name.namespace, &self.name.election);
        true
    }

    async fn run(mut self) {
        let mut pending: Option<Pending> = None;
        loop {
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
                        PendingResult::Write(started, r) => {
                            tracing::debug!(election = %self.name, ok = r.is_ok(), result = ?r.as_ref().map(|o| &o.version).map_err(|e| e.clone()),
                                sent_ago = ?now - started, "write done");
                            self.machine.write_done(now, started, r)
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
