//! The broker's elections: one task per election that any local party takes part in, created
//! on first interest and torn down (watch closed, memory freed) when the last party leaves.
//!
//! - [`Elections`] (this module): the registry, and the commands it sends to the tasks;
//! - `task`: the task of one election, which owns a [`Contender`](crate::election::Contender)
//!   and does its I/O: lock reads and writes (bounded by the renew deadline), lock observations
//!   from the [`WatchHub`], commands from the socket layer;
//! - [`notice`]: what parties are told ([`PartyEvent`]) and where it goes ([`PartySink`]):
//!   delivery is a non-blocking enqueue, so a slow client never stalls an election;
//! - [`info`]: the `/elections` view.
//!
//! ```no_run
//! # async fn demo() {
//! use elector_broker::registry::{Elections, Defaults};
//! use elector_broker::lock::Backends;
//! let elections = Elections::new(Backends::memory(), Defaults::default(), None);
//! # }
//! ```

mod info;
mod notice;
mod task;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::election::{Candidacy, ElectionTiming, PartyId, StepDown};
use crate::lock::Backends;
use crate::lock::hub::WatchHub;
use crate::metrics::Metrics;
use elector_client::protocol::ElectionName;

pub use crate::election::Farewell;
pub use info::{CandidateInfo, ElectionInfo};
pub use notice::{LeaderNotice, PartyEvent, PartySink};

/// Why joining an election failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Refused(#[from] crate::election::JoinError),
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// How a broker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ShutdownMode {
    /// Tell every local leader `lost` (`broker_shutdown`) and release every held lock, so other
    /// nodes take over at once: for a node going away for good.
    #[default]
    Release,
    /// Tell every local leader `jeopardy` with its guarantee and release nothing: a successor
    /// broker on this node resumes the leaderships (a restart or an upgrade costs no app its
    /// leadership). If none does in time, the locks expire as usual.
    Handoff,
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

enum Command {
    Campaign {
        party: PartyId,
        candidacy: Candidacy,
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
        reason: StepDown,
        farewell: Farewell,
        reply: Option<oneshot::Sender<()>>,
    },
    Info(oneshot::Sender<ElectionInfo>),
    Shutdown(ShutdownMode),
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
    shutting_down: AtomicBool,
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
        let task = task::ElectionTask::new(self.clone(), name.clone(), rx, done_tx);
        tokio::spawn(task.run());
    }

    /// Adds a candidate. Its events (a `leader` event once the lock was read, later `elected`,
    /// `renewed`, `lost`) go to `sink`. `timing` applies when the election has no candidates
    /// yet. With a claim the candidate resumes a leadership: `Resumed` if the lock still
    /// names it in that term (and pod, under attestation; confirmed by a renewal), else `Lost`;
    /// then it campaigns as usual.
    pub async fn campaign(
        &self,
        name: &ElectionName,
        party: PartyId,
        candidacy: Candidacy,
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
                candidacy,
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
    /// if the farewell says so; the lock is handed over or released. Returns once done.
    pub async fn leave(&self, name: &ElectionName, party: PartyId, reason: StepDown, farewell: Farewell) {
        let (reply, rx) = oneshot::channel();
        let sent = {
            let map = self.map();
            map.get(name).is_some_and(|h| {
                h.commands
                    .send(Box::new(Command::Leave {
                        party,
                        reason,
                        farewell,
                        reply: Some(reply),
                    }))
                    .is_ok()
            })
        };
        if sent {
            let _ = rx.await;
        }
    }

    /// Removes a party without waiting and without telling it (its connection is gone):
    /// `Silent` when the app closed it, `Abandon` when the broker cut it.
    pub fn leave_nowait(&self, name: &ElectionName, party: PartyId, farewell: Farewell) {
        if let Some(h) = self.map().get(name) {
            let _ = h.commands.send(Box::new(Command::Leave {
                party,
                reason: StepDown::Resigned,
                farewell,
                reply: None,
            }));
        }
    }

    /// Every election's state.
    pub async fn info(&self) -> Vec<ElectionInfo> {
        self.info_of(&self.names()).await
    }

    /// The names of every election, sorted (for a listing taken a few elections at a time).
    pub fn names(&self) -> Vec<ElectionName> {
        let mut names: Vec<ElectionName> = self.map().keys().cloned().collect();
        names.sort();
        names
    }

    /// The state of these elections, in this order; those that ended meanwhile are left out.
    pub async fn info_of(&self, names: &[ElectionName]) -> Vec<ElectionInfo> {
        let receivers: Vec<_> = {
            let map = self.map();
            names
                .iter()
                .filter_map(|name| {
                    let (tx, rx) = oneshot::channel();
                    let h = map.get(name)?;
                    h.commands.send(Box::new(Command::Info(tx))).ok().map(|_| rx)
                })
                .collect()
        };
        let mut out = Vec::with_capacity(receivers.len());
        for rx in receivers {
            if let Ok(i) = rx.await {
                out.push(i);
            }
        }
        out
    }

    /// Stops every election as `mode` says (release: tell leaders `broker_shutdown` and release
    /// every held lock; hand-off: tell leaders `jeopardy` and write nothing), and waits (up to
    /// `grace`) for all elections to finish.
    pub async fn shutdown(&self, grace: Duration, mode: ShutdownMode) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let mut dones = Vec::new();
        {
            let map = self.map();
            for h in map.values() {
                let _ = h.commands.send(Box::new(Command::Shutdown(mode)));
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
