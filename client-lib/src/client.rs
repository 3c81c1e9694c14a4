//! The connection to the broker: campaigns, observations, reconnects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryDelays;
use crate::codec::{Frame, LineCodec};
use crate::protocol::{
    self, CampaignRequest, ElectionRef, ErrorCode, Event, Hello, LockKind, LostReason, MAX_LINE_BYTES,
    Request, Timing,
};

/// What can go wrong talking to the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the broker at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("the broker refused: {code}: {message}")]
    Broker { code: ErrorCode, message: String },
    #[error("the connection to the broker was lost")]
    Disconnected,
    #[error("the broker sent something unexpected: {0}")]
    Protocol(String),
}

/// What to campaign for.
#[derive(Debug, Clone)]
pub struct CampaignOptions {
    pub election: String,
    /// `None`: the broker's default namespace.
    pub namespace: Option<String>,
    /// The holder identity (usually the pod name).
    pub identity: String,
    pub lock: LockKind,
    pub timing: Option<Timing>,
    pub priority: i32,
}

impl CampaignOptions {
    pub fn new(election: impl Into<String>, identity: impl Into<String>) -> Self {
        CampaignOptions {
            election: election.into(),
            namespace: None,
            identity: identity.into(),
            lock: LockKind::Lease,
            timing: None,
            priority: 0,
        }
    }

    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    pub fn lock(mut self, lock: LockKind) -> Self {
        self.lock = lock;
        self
    }

    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = Some(timing);
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
}

/// A campaign's state as this process sees it. `is_leader` is false whenever the broker is
/// unreachable: any disconnect means "not leader" at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeadershipState {
    pub connected: bool,
    pub leader: Option<String>,
    pub term: Option<u64>,
    pub is_leader: bool,
    /// `Some(why)`: the broker cannot tell who leads (it cannot read the lock); `leader` is
    /// then `None`, meaning "unknown", not "nobody".
    pub unknown: Option<String>,
    /// Leading without a broker (protocol 1.1): the broker went away, and `is_leader` stays
    /// true until `valid_until` at most, while the client reconnects and asks the (new) broker
    /// to confirm the leadership (`Safe`), or is told `Lost` (`broker_unavailable`) at
    /// `valid_until`.
    pub jeopardy: bool,
    /// Until when this leader may act without hearing more from the broker (protocol 1.1,
    /// when this process shares the broker's monotonic clock).
    pub valid_until: Option<tokio::time::Instant>,
}

/// A typed event of one campaign or observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CampaignEvent {
    /// Who leads now (`None`: nobody holds a live lease, unless `unknown` says why the broker
    /// cannot tell).
    Leader {
        leader: Option<String>,
        term: Option<u64>,
        unknown: Option<String>,
    },
    /// This process leads, in `term` (a fencing token that only grows).
    Elected { term: u64 },
    /// This process no longer leads.
    Lost { term: u64, reason: LostReason },
    /// The broker went away while this process led: it goes on leading until `valid_until` at
    /// most, unless a broker confirms it first ([`CampaignEvent::Safe`]).
    Jeopardy {
        term: u64,
        valid_until: tokio::time::Instant,
    },
    /// A broker confirmed the leadership after a jeopardy: same term, new guarantee.
    Safe { term: u64 },
}

/// (namespace, election, role): one connection may both campaign in and observe an election.
type Key = (String, String, Role);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Campaign,
    Observe,
}

struct Registration {
    request: Request,
    state: watch::Sender<LeadershipState>,
    events: mpsc::UnboundedSender<CampaignEvent>,
}

impl Registration {
    /// Takes a leader into jeopardy (its broker went away) if it has a guarantee left on a
    /// shared clock, else it has lost.
    fn broker_gone(&self, now: tokio::time::Instant, lost: LostReason) {
        let was = self.state.borrow().clone();
        if !was.is_leader {
            self.state.send_modify(|s| {
                *s = LeadershipState::default();
            });
            return;
        }
        let term = was.term.unwrap_or(0);
        match was.valid_until.filter(|v| *v > now) {
            Some(valid_until) => {
                self.state.send_modify(|s| {
                    s.connected = false;
                    s.jeopardy = true;
                });
                if !was.jeopardy {
                    let _ = self.events.send(CampaignEvent::Jeopardy { term, valid_until });
                }
            }
            None => {
                self.state.send_replace(LeadershipState::default());
                let _ = self.events.send(CampaignEvent::Lost { term, reason: lost });
            }
        }
    }

    /// Ends a jeopardy whose guarantee ran out.
    fn expire(&self, now: tokio::time::Instant) {
        let s = self.state.borrow().clone();
        if s.jeopardy && s.valid_until.is_none_or(|v| v <= now) {
            let connected = s.connected;
            self.state.send_replace(LeadershipState {
                connected,
                ..LeadershipState::default()
            });
            let _ = self.events.send(CampaignEvent::Lost {
                term: s.term.unwrap_or(0),
                reason: LostReason::BrokerUnavailable,
            });
        }
    }

    /// What to send to a (new) broker: a leader in jeopardy resumes, everyone else registers
    /// again.
    fn request_for_new_broker(&self) -> Request {
        let s = self.state.borrow();
        match (&self.request, s.jeopardy, s.term, s.valid_until) {
            (Request::Campaign(c), true, Some(term), Some(valid_until)) => Request::Resume(CampaignRequest {
                term: Some(term),
                valid_until: Some(crate::clock::to_monotonic_ns(valid_until)),
                ..c.clone()
            }),
            (r, ..) => r.clone(),
        }
    }
}

/// A request that waits for the broker's answer.
struct Waiting {
    reply: Option<oneshot::Sender<Result<(), Error>>>,
    key: Key,
    /// `resign` / `unobserve`: the registration ends with the answer.
    leaving: bool,
    /// The `resign` / `unobserve` request, to send again to the next broker if this one goes
    /// away before answering.
    request: Option<Request>,
}

/// The earliest end of a jeopardy.
fn next_expiry(regs: &HashMap<Key, Registration>) -> Option<tokio::time::Instant> {
    regs.values()
        .filter_map(|r| {
            let s = r.state.borrow();
            s.jeopardy.then_some(s.valid_until).flatten()
        })
        .min()
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

impl Cmd {
    fn key(&self) -> &Key {
        match self {
            Cmd::Register { key, .. } | Cmd::Unregister { key, .. } => key,
        }
    }
}

enum Cmd {
    Register {
        key: Key,
        request: Request,
        state: watch::Sender<LeadershipState>,
        events: mpsc::UnboundedSender<CampaignEvent>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Unregister {
        key: Key,
        request: Request,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
}

/// A connection to the broker, re-established with back-off whenever it breaks; campaigns and
/// observations are re-made after a reconnect. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Cmd>,
    hello: watch::Receiver<Option<Hello>>,
    _stop: Arc<StopOnDrop>,
}

#[derive(Debug)]
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

type Lines = FramedRead<tokio::net::unix::OwnedReadHalf, LineCodec>;
type Writer = FramedWrite<tokio::net::unix::OwnedWriteHalf, LinesCodec>;

async fn dial(path: &Path) -> Result<(Lines, Writer, Hello), Error> {
    let connect_err = |source: std::io::Error| Error::Connect {
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
    let stream = UnixStream::connect(path).await.map_err(connect_err)?;
    let (r, w) = stream.into_split();
    let mut lines = FramedRead::new(r, LineCodec::new(MAX_LINE_BYTES));
    let writer = FramedWrite::new(w, LinesCodec::new());
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next())
        .await
        .map_err(|_| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no greeting within 10s",
            ))
        })?;
    match first {
        Some(Ok(Frame::Line(l))) => match protocol::parse_event(&l) {
            Ok(Event::Hello(h)) => Ok((lines, writer, h)),
            Ok(Event::Error(e)) => Err(Error::Broker {
                code: e.code,
                message: e.message,
            }),
            other => Err(Error::Protocol(format!("expected a greeting, got {other:?}"))),
        },
        _ => Err(connect_err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the greeting",
        ))),
    }
}

/// Whether the broker's guarantees can be held to on this process's clock: it stated its
/// `CLOCK_MONOTONIC` in the greeting (protocol 1.1) and that reads like ours.
fn shares_clock(hello: &Hello) -> bool {
    hello.monotonic_now.is_some_and(crate::clock::is_shared)
}

impl Client {
    /// Connects to the broker's socket (fails if it cannot be reached now; later disconnects
    /// are retried in the background).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref().to_path_buf();
        let (lines, writer, hello) = dial(&path).await?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (hello_tx, hello_rx) = watch::channel(Some(hello));
        let stop = CancellationToken::new();
        tokio::spawn(manage(path, lines, writer, rx, hello_tx, stop.clone()));
        Ok(Client {
            commands,
            hello: hello_rx,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// The broker's greeting of the current connection.
    pub fn hello(&self) -> Option<Hello> {
        self.hello.borrow().clone()
    }

    fn default_namespace(&self) -> String {
        self.hello()
            .map(|h| h.default_namespace)
            .unwrap_or_else(|| "default".into())
    }

    async fn register(&self, key: Key, request: Request) -> Result<Registered, Error> {
        let (state_tx, state_rx) = watch::channel(LeadershipState {
            connected: true,
            ..Default::default()
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Cmd::Register {
                key: key.clone(),
                request,
                state: state_tx,
                events: events_tx,
                reply,
            })
            .map_err(|_| Error::Disconnected)?;
        rx.await.map_err(|_| Error::Disconnected)??;
        Ok(Registered {
            key,
            state: state_rx,
            events: Some(events_rx),
        })
    }

    /// Becomes a candidate. Returns once the broker accepted the campaign.
    pub async fn campaign(&self, options: CampaignOptions) -> Result<Campaign, Error> {
        let namespace = options
            .namespace
            .clone()
            .unwrap_or_else(|| self.default_namespace());
        let request = Request::Campaign(CampaignRequest {
            id: None,
            election: options.election.clone(),
            namespace: Some(namespace.clone()),
            identity: Some(options.identity.clone()),
            lock: Some(options.lock),
            timing: options.timing,
            priority: Some(options.priority),
            term: None,
            valid_until: None,
        });
        let reg = self
            .register((namespace, options.election.clone(), Role::Campaign), request)
            .await?;
        Ok(Campaign {
            client: self.clone(),
            reg,
            identity: options.identity,
            resigned: false,
        })
    }

    /// Watches an election without taking part.
    pub async fn observe(
        &self,
        election: &str,
        namespace: Option<&str>,
        lock: LockKind,
    ) -> Result<Observation, Error> {
        let namespace = namespace
            .map(str::to_string)
            .unwrap_or_else(|| self.default_namespace());
        let request = Request::Observe(ElectionRef {
            id: None,
            election: election.to_string(),
            namespace: Some(namespace.clone()),
            lock: Some(lock),
        });
        let reg = self
            .register((namespace, election.to_string(), Role::Observe), request)
            .await?;
        Ok(Observation { reg })
    }
}

struct Registered {
    key: Key,
    state: watch::Receiver<LeadershipState>,
    events: Option<mpsc::UnboundedReceiver<CampaignEvent>>,
}

impl Registered {
    fn take_events(&mut self) -> EventStream {
        EventStream(self.events.take())
    }
}

/// The events of a campaign or observation, in order (see [`Campaign::events`]).
#[derive(Debug)]
pub struct EventStream(Option<mpsc::UnboundedReceiver<CampaignEvent>>);

impl Stream for EventStream {
    type Item = CampaignEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<CampaignEvent>> {
        match &mut self.0 {
            Some(rx) => rx.poll_recv(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered").field("key", &self.key).finish()
    }
}

/// A campaign in one election. Dropping it resigns.
#[derive(Debug)]
pub struct Campaign {
    client: Client,
    reg: Registered,
    identity: String,
    resigned: bool,
}

impl Campaign {
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The latest state, always up to date (a `watch` receiver).
    pub fn state(&self) -> watch::Receiver<LeadershipState> {
        self.reg.state.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.reg.state.borrow().is_leader
    }

    /// Every event, in order, as an owned stream (so a task can consume it while the
    /// `Campaign` is kept for [`Campaign::resign`]). It can be taken once; later calls return
    /// an empty stream. [`Campaign::state`] is the way to watch from several places.
    pub fn events(&mut self) -> EventStream {
        self.reg.take_events()
    }

    /// Waits until this campaign leads; returns the term.
    pub async fn elected(&self) -> Result<u64, Error> {
        let mut rx = self.state();
        let s = rx
            .wait_for(|s| s.is_leader)
            .await
            .map_err(|_| Error::Disconnected)?;
        Ok(s.term.unwrap_or(0))
    }

    /// Waits until leading, then runs `work` with a token that is cancelled the moment
    /// leadership is lost (or the broker becomes unreachable). Returns what `work` returns.
    pub async fn run_while_leader<F, Fut, T>(&self, work: F) -> Result<T, Error>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let term = self.elected().await?;
        let token = CancellationToken::new();
        let mut rx = self.state();
        let watcher = {
            let token = token.clone();
            tokio::spawn(async move {
                let _ = rx.wait_for(|s| !s.is_leader || s.term != Some(term)).await;
                token.cancel();
            })
        };
        let out = work(token).await;
        watcher.abort();
        Ok(out)
    }

    /// Gives up the campaign; if leading, the broker hands over or releases at once.
    pub async fn resign(mut self) -> Result<(), Error> {
        self.resigned = true;
        let (reply, rx) = oneshot::channel();
        let request = Request::Resign(ElectionRef {
            id: None,
            election: self.reg.key.1.clone(),
            namespace: Some(self.reg.key.0.clone()),
            lock: None,
        });
        self.client
            .commands
            .send(Cmd::Unregister {
                key: self.reg.key.clone(),
                request,
                reply: Some(reply),
            })
            .map_err(|_| Error::Disconnected)?;
        rx.await.map_err(|_| Error::Disconnected)?
    }
}

impl Drop for Campaign {
    fn drop(&mut self) {
        if !self.resigned {
            let request = Request::Resign(ElectionRef {
                id: None,
                election: self.reg.key.1.clone(),
                namespace: Some(self.reg.key.0.clone()),
                lock: None,
            });
            let _ = self.client.commands.send(Cmd::Unregister {
                key: self.reg.key.clone(),
                request,
                reply: None,
            });
        }
    }
}

/// An observation of one election.
#[derive(Debug)]
pub struct Observation {
    reg: Registered,
}

impl Observation {
    pub fn state(&self) -> watch::Receiver<LeadershipState> {
        self.reg.state.clone()
    }

    /// Every event, in order (can be taken once, like [`Campaign::events`]).
    pub fn events(&mut self) -> EventStream {
        self.reg.take_events()
    }
}

fn with_id(request: &Request, id: u64) -> Request {
    let mut r = request.clone();
    let id = Some(Value::from(id));
    match &mut r {
        Request::Campaign(c) | Request::Resume(c) => c.id = id,
        Request::Resign(e) | Request::Observe(e) | Request::Unobserve(e) => e.id = id,
        Request::Status(b) | Request::Ping(b) => b.id = id,
    }
    r
}

/// The connection manager: one task per `Client`.
async fn manage(
    path: PathBuf,
    lines: Lines,
    writer: Writer,
    mut commands: mpsc::UnboundedReceiver<Cmd>,
    hello: watch::Sender<Option<Hello>>,
    stop: CancellationToken,
) {
    let mut regs: HashMap<Key, Registration> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut backoff = RetryDelays::starting_at(Duration::from_millis(50));
    let mut shared_clock = hello.borrow().as_ref().is_some_and(shares_clock);
    // Resumes sent to a new broker, by request id: one it refuses is sent as a campaign.
    let mut resumes: HashMap<u64, Key> = HashMap::new();
    // Registrations that wait for the answer to a `resign`/`unobserve` of the same key (a
    // campaign started again right after a resign): the old party's last events (its `lost`)
    // come before that answer and must not reach the new registration, nor may the answer
    // remove it.
    let mut deferred: std::collections::VecDeque<Cmd> = std::collections::VecDeque::new();
    let mut connection = (lines, writer);
    loop {
        let (mut lines, mut writer) = connection;
        // Serve one connection until it breaks.
        let mut pending: HashMap<u64, Waiting> = HashMap::new();
        loop {
            let leaving = |pending: &HashMap<u64, Waiting>, key: &Key| {
                pending.values().any(|w| w.leaving && &w.key == key)
            };
            let ready = deferred
                .iter()
                .position(|c| !leaving(&pending, c.key()))
                .and_then(|i| deferred.remove(i));
            tokio::select! {
                // A ready deferred registration must be taken, not dropped for another branch.
                biased;
                _ = stop.cancelled() => return,
                cmd = async { match ready { Some(c) => Some(c), None => commands.recv().await } } => {
                    let Some(cmd) = cmd else { return };
                    if matches!(cmd, Cmd::Register { .. }) && leaving(&pending, cmd.key()) {
                        deferred.push_back(cmd);
                        continue;
                    }
                    let (request, waiting) = match cmd {
                        Cmd::Register { key, request, state, events, reply } => {
                            regs.insert(key.clone(), Registration { request: request.clone(), state, events });
                            (request, Waiting { reply: Some(reply), key, leaving: false, request: None })
                        }
                        // The registration stays until the broker answers: a `lost` (resigned)
                        // comes before the `ok`, and it must reach the campaign's events.
                        Cmd::Unregister { key, request, reply } => {
                            (request.clone(), Waiting { reply, key, leaving: true, request: Some(request) })
                        }
                    };
                    let id = next_id;
                    next_id += 1;
                    let line = serde_json::to_string(&with_id(&request, id)).unwrap_or_default();
                    pending.insert(id, waiting);
                    if writer.send(line).await.is_err() {
                        break;
                    }
                }
                frame = lines.next() => {
                    let line = match frame {
                        Some(Ok(Frame::Line(l))) => l,
                        Some(Ok(Frame::TooLong)) => continue,
                        _ => break,
                    };
                    let Ok(event) = protocol::parse_event(&line) else { continue };
                    if let Event::Reconnect(r) = &event {
                        // A successor broker serves the socket now (a rolling upgrade): move
                        // there at once rather than wait for this broker to close.
                        tracing::info!(reason = %r.reason, "the broker asks to reconnect: moving to its successor");
                        break;
                    }
                    if let Event::Error(e) = &event
                        && let Some(key) = e.id.as_ref().and_then(Value::as_u64).and_then(|id| resumes.remove(&id))
                        && let Some(reg) = regs.get(&key)
                    {
                        // A broker that cannot resume (protocol 1.0: `unknown_op`): campaign.
                        tracing::info!(code = %e.code, "the broker did not resume a leadership: campaigning");
                        let line = serde_json::to_string(&with_id(&reg.request, next_id)).unwrap_or_default();
                        next_id += 1;
                        if writer.send(line).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    dispatch(event, &mut regs, &mut pending, shared_clock);
                }
                _ = sleep_until_opt(next_expiry(&regs)) => {
                    let now = tokio::time::Instant::now();
                    regs.values().for_each(|r| r.expire(now));
                }
            }
        }
        // Disconnected: leaders with a guarantee left go on in jeopardy; nobody else leads.
        // The old connection is closed before dialing (after `reconnect` the old broker waits
        // for nothing, and must not see this client linger).
        drop((lines, writer));
        hello.send_replace(None);
        resumes.clear();
        let now = tokio::time::Instant::now();
        for reg in regs.values() {
            reg.broker_gone(now, LostReason::Disconnected);
        }
        for (_, waiting) in pending.drain() {
            if waiting.leaving {
                let in_jeopardy = waiting.key.2 == Role::Campaign
                    && regs.get(&waiting.key).is_some_and(|r| r.state.borrow().jeopardy);
                if in_jeopardy && let Some(request) = waiting.request {
                    // A resign the broker went away without answering (the app resigned on
                    // `jeopardy`, say), of a leader that rides the disconnect out: it resumes at
                    // the next broker and resigns there, so its lock is released at once
                    // instead of being left to expire.
                    deferred.push_front(Cmd::Unregister {
                        key: waiting.key,
                        request,
                        reply: waiting.reply,
                    });
                    continue;
                }
                regs.remove(&waiting.key);
            }
            if let Some(reply) = waiting.reply {
                let _ = reply.send(Err(Error::Disconnected));
            }
        }
        // Reconnect at once (a broker hand-off leaves a successor on the socket already),
        // then with back-off, ending jeopardies that run out meanwhile; then resume, campaign
        // and observe again.
        let mut wait = Duration::ZERO;
        let (lines, mut writer) = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = sleep_until_opt(next_expiry(&regs)) => {
                    let now = tokio::time::Instant::now();
                    regs.values().for_each(|r| r.expire(now));
                    continue;
                }
            }
            wait = backoff.next_delay();
            // A broker that accepts but is slow to greet must not hold up the end of a
            // jeopardy: `lost` comes at `valid_until`, never later.
            let dialing = dial(&path);
            tokio::pin!(dialing);
            let dialed = loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    dialed = &mut dialing => break dialed,
                    _ = sleep_until_opt(next_expiry(&regs)) => {
                        let now = tokio::time::Instant::now();
                        regs.values().for_each(|r| r.expire(now));
                    }
                }
            };
            if let Ok((l, w, h)) = dialed {
                shared_clock = shares_clock(&h);
                hello.send_replace(Some(h));
                backoff.reset();
                break (l, w);
            }
        };
        for (key, reg) in regs.iter() {
            reg.state.send_modify(|s| s.connected = true);
            let request = reg.request_for_new_broker();
            if matches!(request, Request::Resume(_)) {
                resumes.insert(next_id, key.clone());
            }
            let line = serde_json::to_string(&with_id(&request, next_id)).unwrap_or_default();
            next_id += 1;
            if writer.send(line).await.is_err() {
                // Broken again: the serving loop notices at its first read.
                break;
            }
        }
        connection = (lines, writer);
    }
}

fn dispatch(
    event: Event,
    regs: &mut HashMap<Key, Registration>,
    pending: &mut HashMap<u64, Waiting>,
    shared_clock: bool,
) {
    let guarantee = |ns: Option<u64>| ns.filter(|_| shared_clock).map(crate::clock::from_monotonic_ns);
    let campaign = |regs: &HashMap<Key, Registration>, name: &protocol::ElectionName| {
        regs.get(&(name.namespace.clone(), name.election.clone(), Role::Campaign))
            .map(|r| (r.state.clone(), r.events.clone()))
    };
    let reply_id = |id: &Option<Value>| id.as_ref().and_then(Value::as_u64);
    match event {
        Event::Ok(ok) => {
            if let Some(waiting) = reply_id(&ok.id).and_then(|id| pending.remove(&id)) {
                if waiting.leaving {
                    regs.remove(&waiting.key);
                }
                if let Some(reply) = waiting.reply {
                    let _ = reply.send(Ok(()));
                }
            }
        }
        Event::Error(e) => {
            if let Some(waiting) = reply_id(&e.id).and_then(|id| pending.remove(&id)) {
                // Refused: a registration the broker did not take is not kept (nor re-sent
                // after a reconnect); one that was leaving is gone either way.
                regs.remove(&waiting.key);
                if let Some(reply) = waiting.reply {
                    let _ = reply.send(Err(Error::Broker {
                        code: e.code,
                        message: e.message,
                    }));
                }
            } else {
                tracing::warn!(code = %e.code, "broker error: {}", e.message);
            }
        }
        Event::Leader(l) => {
            for role in [Role::Campaign, Role::Observe] {
                let Some(reg) = regs.get(&(l.name.namespace.clone(), l.name.election.clone(), role)) else {
                    continue;
                };
                reg.state.send_modify(|s| {
                    s.connected = true;
                    s.unknown = l.unknown.clone();
                    // A leader (in jeopardy, resuming at a new broker that has not read the
                    // lock yet) goes on naming itself until it is told `safe` or `lost`.
                    if !(role == Role::Campaign && s.is_leader) {
                        s.leader = l.leader.clone();
                        s.term = l.term;
                    }
                });
                let _ = reg.events.send(CampaignEvent::Leader {
                    leader: l.leader.clone(),
                    term: l.term,
                    unknown: l.unknown.clone(),
                });
            }
        }
        Event::Elected(e) => {
            if let Some(reg) = regs.get(&(e.name.namespace.clone(), e.name.election.clone(), Role::Campaign))
            {
                reg.state.send_modify(|s| {
                    s.is_leader = true;
                    s.jeopardy = false;
                    s.leader = Some(e.identity.clone());
                    s.term = Some(e.term);
                    s.unknown = None;
                    s.valid_until = guarantee(e.valid_until);
                });
                let _ = reg.events.send(CampaignEvent::Elected { term: e.term });
            }
        }
        Event::Renewed(g) => {
            if let Some((state, _)) = campaign(regs, &g.name) {
                state.send_modify(|s| {
                    if s.is_leader && s.term == Some(g.term) {
                        s.valid_until = guarantee(Some(g.valid_until));
                    }
                });
            }
        }
        Event::Safe(g) => {
            if let Some((state, events)) = campaign(regs, &g.name) {
                let was = state.borrow().clone();
                if was.jeopardy && was.term == Some(g.term) {
                    state.send_modify(|s| {
                        s.jeopardy = false;
                        s.connected = true;
                        s.valid_until = guarantee(Some(g.valid_until));
                    });
                    let _ = events.send(CampaignEvent::Safe { term: g.term });
                }
            }
        }
        Event::Jeopardy(g) => {
            // The broker hands off without releasing: hold on to the guarantee it states.
            if let Some(reg) = regs.get(&(g.name.namespace.clone(), g.name.election.clone(), Role::Campaign))
            {
                reg.state.send_modify(|s| {
                    if s.is_leader && s.term == Some(g.term) {
                        s.valid_until = guarantee(Some(g.valid_until));
                    }
                });
                reg.broker_gone(tokio::time::Instant::now(), LostReason::BrokerShutdown);
            }
        }
        Event::Lost(l) => {
            if let Some(reg) = regs.get(&(l.name.namespace.clone(), l.name.election.clone(), Role::Campaign))
            {
                let was = reg.state.borrow().clone();
                reg.state.send_modify(|s| {
                    s.is_leader = false;
                    s.jeopardy = false;
                    s.valid_until = None;
                });
                if was.is_leader {
                    let _ = reg.events.send(CampaignEvent::Lost {
                        term: l.term,
                        reason: l.reason,
                    });
                }
            }
        }
        Event::Hello(_) | Event::Status(_) | Event::Pong(_) | Event::Reconnect(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ElectedEvent, ElectionName};

    fn registration() -> (
        Registration,
        watch::Receiver<LeadershipState>,
        mpsc::UnboundedReceiver<CampaignEvent>,
    ) {
        let (state, state_rx) = watch::channel(LeadershipState::default());
        let (events, events_rx) = mpsc::unbounded_channel();
        let request = Request::Campaign(CampaignRequest {
            id: None,
            election: "e".into(),
            namespace: Some("ns".into()),
            identity: Some("me".into()),
            lock: None,
            timing: None,
            priority: None,
            term: None,
            valid_until: None,
        });
        (
            Registration {
                request,
                state,
                events,
            },
            state_rx,
            events_rx,
        )
    }

    fn elected(valid_in: Duration) -> Event {
        Event::Elected(ElectedEvent {
            name: ElectionName {
                election: "e".into(),
                namespace: "ns".into(),
                lock: LockKind::Lease,
            },
            identity: "me".into(),
            term: 4,
            valid_until: Some(crate::clock::to_monotonic_ns(
                tokio::time::Instant::now() + valid_in,
            )),
        })
    }

    fn key() -> Key {
        ("ns".into(), "e".into(), Role::Campaign)
    }

    #[tokio::test]
    async fn a_leader_on_a_shared_clock_rides_out_a_disconnect_until_its_guarantee() {
        let (reg, state, mut events) = registration();
        let mut regs = HashMap::from([(key(), reg)]);
        dispatch(
            elected(Duration::from_secs(60)),
            &mut regs,
            &mut HashMap::new(),
            true,
        );
        assert!(matches!(
            events.recv().await,
            Some(CampaignEvent::Elected { term: 4 })
        ));
        regs[&key()].broker_gone(tokio::time::Instant::now(), LostReason::Disconnected);
        let s = state.borrow().clone();
        assert!(s.is_leader && s.jeopardy && !s.connected);
        assert!(matches!(
            events.recv().await,
            Some(CampaignEvent::Jeopardy { term: 4, .. })
        ));
        // At the next broker it resumes with its claim.
        assert!(matches!(
            regs[&key()].request_for_new_broker(),
            Request::Resume(CampaignRequest {
                term: Some(4),
                valid_until: Some(_),
                ..
            })
        ));
        // At the guarantee (here: a time past it), it has lost.
        regs[&key()].expire(tokio::time::Instant::now() + Duration::from_secs(61));
        assert!(!state.borrow().is_leader);
        assert!(matches!(
            events.recv().await,
            Some(CampaignEvent::Lost {
                reason: LostReason::BrokerUnavailable,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_leader_resuming_keeps_naming_itself_while_the_new_broker_cannot_tell() {
        let (reg, state, _events) = registration();
        let mut regs = HashMap::from([(key(), reg)]);
        dispatch(
            elected(Duration::from_secs(60)),
            &mut regs,
            &mut HashMap::new(),
            true,
        );
        regs[&key()].broker_gone(tokio::time::Instant::now(), LostReason::Disconnected);
        // The new broker's first word on the election: it cannot read the lock yet.
        let unknown: Event = serde_json::from_value(serde_json::json!({
            "event": "leader", "election": "e", "namespace": "ns", "lock": "lease",
            "leader": null, "is_me": false, "unknown": "the lock cannot be read: timeout"
        }))
        .unwrap();
        dispatch(unknown, &mut regs, &mut HashMap::new(), true);
        let s = state.borrow().clone();
        assert!(s.is_leader && s.jeopardy, "{s:?}");
        assert_eq!((s.leader.as_deref(), s.term), (Some("me"), Some(4)), "{s:?}");
        assert!(s.unknown.is_some());
    }

    #[tokio::test]
    async fn without_a_shared_clock_a_disconnect_is_a_loss() {
        let (reg, state, mut events) = registration();
        let mut regs = HashMap::from([(key(), reg)]);
        // The broker's clock is not ours (another time namespace): its guarantee means nothing.
        dispatch(
            elected(Duration::from_secs(60)),
            &mut regs,
            &mut HashMap::new(),
            false,
        );
        assert_eq!(state.borrow().valid_until, None);
        let _ = events.recv().await;
        regs[&key()].broker_gone(tokio::time::Instant::now(), LostReason::Disconnected);
        assert!(!state.borrow().is_leader);
        assert!(matches!(
            events.recv().await,
            Some(CampaignEvent::Lost {
                reason: LostReason::Disconnected,
                ..
            })
        ));
        // And a greeting from another clock is recognised as such.
        let hello = |now: u64| Hello {
            protocol: 1,
            broker_version: "t".into(),
            node: "n".into(),
            default_namespace: "d".into(),
            caller: None,
            protocol_minor: Some(1),
            monotonic_now: Some(now),
        };
        assert!(shares_clock(&hello(crate::clock::monotonic_now_ns())));
        assert!(!shares_clock(&hello(
            crate::clock::monotonic_now_ns() + 3_600_000_000_000
        )));
        let mut old = hello(0);
        old.monotonic_now = None;
        assert!(!shares_clock(&old), "a 1.0 broker states no clock");
    }

    /// A campaign started again right after a `resign` whose answer has not come yet (a caller
    /// that stopped waiting for it): the old party's `lost` and the resign's `ok` must not
    /// reach or remove the new campaign. Through a real socket, with a scripted broker.
    #[tokio::test]
    async fn a_campaign_restarted_before_the_resign_is_answered_is_its_own() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let path = std::env::temp_dir().join(format!("elector-client-{}-resign.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let broker = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            let send = async |w: &mut tokio::net::unix::OwnedWriteHalf, v: serde_json::Value| {
                w.write_all(format!("{v}\n").as_bytes()).await.unwrap();
            };
            send(&mut w, serde_json::json!({"event":"hello","protocol":1,"broker_version":"t","node":"n","default_namespace":"ns"})).await;
            let mut next = async || {
                serde_json::from_str::<serde_json::Value>(&lines.next_line().await.unwrap().unwrap()).unwrap()
            };
            let first = next().await;
            assert_eq!(first["op"], "campaign");
            send(
                &mut w,
                serde_json::json!({"event":"ok","id":first["id"],"op":"campaign"}),
            )
            .await;
            send(
                &mut w,
                serde_json::json!({"event":"elected","election":"e","namespace":"ns","lock":"lease","identity":"me","term":4}),
            )
            .await;
            let resign = next().await;
            assert_eq!(resign["op"], "resign");
            // The caller gives up waiting; only then does the broker answer.
            tokio::time::sleep(Duration::from_millis(300)).await;
            send(
                &mut w,
                serde_json::json!({"event":"lost","election":"e","namespace":"ns","lock":"lease","identity":"me","term":4,"reason":"resigned"}),
            )
            .await;
            send(
                &mut w,
                serde_json::json!({"event":"ok","id":resign["id"],"op":"resign"}),
            )
            .await;
            let again = next().await;
            assert_eq!(again["op"], "campaign", "sent after the resign was answered");
            send(
                &mut w,
                serde_json::json!({"event":"ok","id":again["id"],"op":"campaign"}),
            )
            .await;
            send(
                &mut w,
                serde_json::json!({"event":"elected","election":"e","namespace":"ns","lock":"lease","identity":"me","term":5}),
            )
            .await;
            // Keep the connection open until the test is done.
            let _ = lines.next_line().await;
        });
        let client = Client::connect(&path).await.unwrap();
        let options = || {
            CampaignOptions::new("e", "me")
                .namespace("ns")
                .lock(LockKind::Lease)
        };
        let first = client.campaign(options()).await.unwrap();
        let mut first_state = first.state();
        while !first_state.borrow_and_update().is_leader {
            first_state.changed().await.unwrap();
        }
        let gave_up = tokio::time::timeout(Duration::from_millis(50), first.resign()).await;
        assert!(gave_up.is_err(), "the scripted broker answers late");
        let mut second = client.campaign(options()).await.unwrap();
        let mut events = second.events();
        let e = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap();
        assert!(matches!(e, Some(CampaignEvent::Elected { term: 5 })), "{e:?}");
        assert!(second.is_leader());
        drop((second, client));
        broker.abort();
        let _ = std::fs::remove_file(&path);
    }
}
