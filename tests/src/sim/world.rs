//! The simulated world: nodes (clocks, a broker, faults), the API server, apps, and the event
//! queue that orders everything by virtual time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use elector_broker::election::machine::{Action, WritePurpose};
use elector_broker::election::record::LeaderRecord;
use elector_broker::election::{
    Candidacy, Claim, Contender, ElectionTiming, Farewell, LockFailure, LockState, Notification, Observed,
    PartyId, StepDown,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::oracle::{Oracle, Start};

/// A bug class injected to show the oracle finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Machine: the leader is not told `lost` at its renew deadline.
    RenewPastDeadline,
    /// Machine: a foreign record expires by its `renewTime` against the local wall clock.
    WallClockExpiry,
    /// Simulated API usage: a release replaces the object whatever its resourceVersion.
    ReleaseWithoutCas,
    /// Machine: a claim is confirmed whatever term the record carries.
    ResumeAnyTerm,
}

/// One schedule's settings (all but the seed are fixed by default).
#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub mutation: Option<Mutation>,
    /// For shrinking: stop drawing fault actions after this many.
    pub max_fault_actions: Option<usize>,
    pub nodes: usize,
    pub elections: usize,
    /// How long faults go on before they heal.
    pub chaos: Duration,
    pub timing: ElectionTiming,
}

impl Config {
    pub fn for_seed(seed: u64, mutation: Option<Mutation>) -> Self {
        Config {
            seed,
            mutation,
            max_fault_actions: None,
            nodes: 3,
            elections: 2,
            chaos: Duration::from_secs(30),
            timing: ElectionTiming::default(),
        }
    }
}

/// Figures of one or more schedules.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub schedules: u64,
    pub virtual_time: Duration,
    /// Leadership transitions checked (`elected`, `resumed`, `lost` received by apps).
    pub transitions: u64,
    /// Oracle checks (each leadership start, each liveness check).
    pub checks: u64,
    /// Events delivered (messages, timers, API answers).
    pub events: u64,
    pub fault_actions: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.schedules += o.schedules;
        self.virtual_time += o.virtual_time;
        self.transitions += o.transitions;
        self.checks += o.checks;
        self.events += o.events;
        self.fault_actions += o.fault_actions;
    }
}

/// What one schedule did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub stats: Stats,
    pub fault_actions: usize,
    pub violation: Option<String>,
    /// The notable events (faults, leadership changes), most recent last.
    pub trace: Vec<String>,
}

type Raw = ();

#[derive(Debug, Clone)]
enum Op {
    Get,
    Create(LeaderRecord),
    Replace {
        base: String,
        record: LeaderRecord,
        no_cas: bool,
    },
}

#[derive(Debug, Clone)]
enum Answer {
    Read(Result<LockState<Raw>, LockFailure>),
    Write(Result<Observed<Raw>, LockFailure>),
}

#[derive(Debug, Clone)]
enum AppMsg {
    Join { claim: Option<Claim> },
    Observe,
    Leave { farewell: Farewell },
}

#[derive(Debug, Clone)]
enum Ev {
    Wake {
        node: usize,
        el: usize,
        inc: u64,
        generation: u64,
    },
    Arrive {
        node: usize,
        el: usize,
        inc: u64,
        req: u64,
        op: Op,
    },
    Answer {
        node: usize,
        el: usize,
        inc: u64,
        req: u64,
        answer: Answer,
    },
    Timeout {
        node: usize,
        el: usize,
        inc: u64,
        req: u64,
    },
    Watch {
        node: usize,
        el: usize,
        inc: u64,
        state: LockState<Raw>,
    },
    ToBroker {
        node: usize,
        inc: u64,
        app: usize,
        party: PartyId,
        msg: AppMsg,
    },
    ToApp {
        app: usize,
        party: PartyId,
        n: Notification,
    },
    Eof {
        app: usize,
        party: PartyId,
    },
    Reconnect {
        app: usize,
    },
    Fault,
    Restart {
        node: usize,
    },
    Heal,
    Check,
}

struct Scheduled {
    at: Duration,
    tie: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.tie) == (o.at, o.tie)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        // Earliest first from a max-heap.
        (o.at, o.tie).cmp(&(self.at, self.tie))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Partition {
    None,
    /// Requests and watch events are lost.
    Full,
    /// Requests reach the server and apply; answers and watch events are lost.
    OneWay,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Burst {
    Conflict,
    TooMany,
    Internal,
    /// Applied, then answered 504.
    AppliedTimeout,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum WatchFault {
    Ok,
    Stalled(Duration),
    /// Events are lost until it heals (then a re-list, as after a 410).
    Gap,
}

struct Driver {
    machine: Contender<Raw>,
    pending: Option<u64>,
    started: Instant,
    generation: u64,
    parties: Vec<(PartyId, usize)>,
}

struct Node {
    offset: Duration,
    rate: f64,
    wall_skew: chrono::TimeDelta,
    /// The broker's incarnation while it runs.
    broker: Option<u64>,
    incarnations: u64,
    drivers: Vec<Option<Driver>>,
    partition: Partition,
    extra_latency: Duration,
    /// Requests wait in the API server's queue (API Priority and Fairness queues for up to a
    /// minute) and may run long after the broker gave up on them.
    queueing: Duration,
    burst: Option<Burst>,
    watch: WatchFault,
    watch_fifo: Vec<Duration>,
}

struct App {
    node: usize,
    el: usize,
    identity: String,
    candidate: bool,
    prompt: bool,
    alive: bool,
    conn: Option<(PartyId, u64)>,
    /// The claim to send on the next (re)connection, and the term it names.
    claim: Option<Claim>,
    claimed: Option<u64>,
    guarantee: Option<Instant>,
    fifo: Duration,
    last_term: Option<u64>,
}

struct World {
    cfg: Config,
    rng: StdRng,
    fault_rng: StdRng,
    origin: Instant,
    epoch: chrono::DateTime<chrono::Utc>,
    now: Duration,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    objects: Vec<Option<(u64, LeaderRecord)>>,
    rv: u64,
    apps: Vec<App>,
    oracle: Oracle,
    next_id: u64,
    healed: bool,
    fault_actions: usize,
    events: u64,
    trace: Vec<String>,
    violation: Option<String>,
}

const MAX_EVENTS: u64 = 2_000_000;

/// Runs one schedule to its end (or its first violation).
pub fn run_schedule(cfg: &Config) -> Outcome {
    let mut w = World::new(cfg.clone());
    w.setup();
    while let Some(s) = w.queue.pop() {
        if w.violation.is_some() {
            break;
        }
        w.now = s.at;
        w.events += 1;
        if w.events > MAX_EVENTS {
            w.violation = Some(format!("more than {MAX_EVENTS} events: a livelock"));
            break;
        }
        w.handle(s.ev);
    }
    let stats = Stats {
        schedules: 1,
        virtual_time: w.now,
        transitions: w.oracle.transitions,
        checks: w.oracle.checks,
        events: w.events,
        fault_actions: w.fault_actions as u64,
    };
    Outcome {
        seed: cfg.seed,
        stats,
        fault_actions: w.fault_actions,
        violation: w.violation.take(),
        trace: w.trace,
    }
}

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

impl World {
    fn new(cfg: Config) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let fault_rng = StdRng::seed_from_u64(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
        let nodes = (0..cfg.nodes)
            .map(|_| Node {
                offset: Duration::from_millis(rng.random_range(0..3_600_000)),
                rate: 1.0 + rng.random_range(-0.01..=0.01),
                wall_skew: chrono::TimeDelta::seconds(rng.random_range(-3600..=3600)),
                broker: Some(0),
                incarnations: 1,
                drivers: (0..cfg.elections).map(|_| None).collect(),
                partition: Partition::None,
                extra_latency: Duration::ZERO,
                queueing: Duration::ZERO,
                burst: None,
                watch: WatchFault::Ok,
                watch_fifo: vec![Duration::ZERO; cfg.elections],
            })
            .collect();
        World {
            objects: vec![None; cfg.elections],
            oracle: Oracle::new(cfg.elections),
            rng,
            fault_rng,
            origin: Instant::now(),
            epoch: chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap_or_default(),
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            nodes,
            rv: 0,
            apps: Vec::new(),
            next_id: 1,
            healed: false,
            fault_actions: 0,
            events: 0,
            trace: Vec::new(),
            violation: None,
            cfg,
        }
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>9.3}s {what}", self.now.as_secs_f64());
        self.trace.push(line);
    }

    fn at(&mut self, delay: Duration, ev: Ev) {
        let tie = self.rng.random();
        self.queue.push(Scheduled {
            at: self.now + delay,
            tie,
            ev,
        });
    }

    fn local(&self, node: usize) -> Instant {
        let n = &self.nodes[node];
        self.origin + n.offset + self.now.mul_f64(n.rate)
    }

    fn wall(&self, node: usize) -> chrono::DateTime<chrono::Utc> {
        self.epoch + chrono::TimeDelta::from_std(self.now).unwrap_or_default() + self.nodes[node].wall_skew
    }

    /// The virtual time at which `node`'s clock reads `at`.
    fn real(&self, node: usize, at: Instant) -> Duration {
        let n = &self.nodes[node];
        at.checked_duration_since(self.origin + n.offset)
            .unwrap_or_default()
            .div_f64(n.rate)
    }

    fn latency(&mut self, node: usize) -> Duration {
        let extra = self.nodes[node].extra_latency;
        let mut d = ms(self.rng.random_range(1..20));
        if extra > Duration::ZERO {
            d += extra.mul_f64(self.rng.random_range(0.0..1.0));
        }
        d
    }

    fn setup(&mut self) {
        let nodes = self.cfg.nodes;
        for el in 0..self.cfg.elections {
            // One candidate per node, a second on one of them (for hand-overs).
            for node in 0..nodes {
                self.new_app(node, el, true, true, None, None);
            }
            let second = self.rng.random_range(0..nodes);
            self.new_app(second, el, true, true, None, None);
            let slow = self.rng.random_range(0..nodes);
            self.new_app(slow, el, true, false, None, None);
            let obs = self.rng.random_range(0..nodes);
            self.new_app(obs, el, false, true, None, None);
        }
        self.at(ms(500), Ev::Fault);
        let chaos = self.cfg.chaos;
        self.at(chaos, Ev::Heal);
    }

    fn new_app(
        &mut self,
        node: usize,
        el: usize,
        candidate: bool,
        prompt: bool,
        identity: Option<String>,
        claim: Option<(Claim, u64)>,
    ) -> usize {
        let id = self.oracle.add_app(el);
        self.apps.push(App {
            node,
            el,
            identity: identity.unwrap_or_else(|| format!("app-{id}")),
            candidate,
            prompt,
            alive: true,
            conn: None,
            claim: claim.map(|c| c.0),
            claimed: claim.map(|c| c.1),
            guarantee: None,
            fifo: Duration::ZERO,
            last_term: None,
        });
        let d = ms(self.rng.random_range(0..5));
        self.at(d, Ev::Reconnect { app: id });
        id
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Wake {
                node,
                el,
                inc,
                generation,
            } => {
                if self
                    .live_driver(node, el, inc)
                    .is_some_and(|d| d.generation == generation)
                {
                    self.drive(node, el);
                }
            }
            Ev::Arrive {
                node,
                el,
                inc,
                req,
                op,
            } => self.arrive(node, el, inc, req, op),
            Ev::Answer {
                node,
                el,
                inc,
                req,
                answer,
            } => self.answer(node, el, inc, req, answer),
            Ev::Timeout { node, el, inc, req } => {
                let limit = self.cfg.timing.renew_deadline;
                let failure = LockFailure::transient(format!("no answer within {limit:?}"));
                // Reads have even request ids, writes odd ones.
                let answer = if req % 2 == 0 {
                    Answer::Read(Err(failure))
                } else {
                    Answer::Write(Err(failure))
                };
                self.answer(node, el, inc, req, answer);
            }
            Ev::Watch { node, el, inc, state } => {
                if self.live_driver(node, el, inc).is_some() {
                    let now = self.local(node);
                    if let Some(d) = self.nodes[node].drivers[el].as_mut() {
                        d.machine.observe(now, state);
                    }
                    self.drive(node, el);
                }
            }
            Ev::ToBroker {
                node,
                inc,
                app,
                party,
                msg,
            } => self.broker_receives(node, inc, app, party, msg),
            Ev::ToApp { app, party, n } => self.app_receives(app, party, n),
            Ev::Eof { app, party } => self.eof(app, party),
            Ev::Reconnect { app } => self.reconnect(app),
            Ev::Fault => self.fault(),
            Ev::Restart { node } => self.restart(node),
            Ev::Heal => self.heal(),
            Ev::Check => self.check_liveness(),
        }
    }

    fn live_driver(&self, node: usize, el: usize, inc: u64) -> Option<&Driver> {
        if self.nodes[node].broker != Some(inc) {
            return None;
        }
        self.nodes[node].drivers[el].as_ref()
    }

    /// Polls the machine and does what it asks, as `registry/task.rs` does.
    fn drive(&mut self, node: usize, el: usize) {
        let (now, wall) = (self.local(node), self.wall(node));
        let Some(inc) = self.nodes[node].broker else {
            return;
        };
        let Some(d) = self.nodes[node].drivers[el].as_mut() else {
            return;
        };
        let action = d.machine.poll(now, wall);
        self.deliver(node, el);
        let mutation = self.cfg.mutation;
        let mut wait = None;
        // A wake-up at an instant already past is what `wake_while_in_flight` returns once a
        // first read has been unanswered for a retry period: the real driver then polls in a
        // busy loop until the read ends (each poll changes nothing). The simulator polls again
        // on the next input instead, which is the same but for the CPU.
        match action {
            Action::Wait(until) => wait = until,
            Action::Read => self.send(node, el, inc, Op::Get, false),
            Action::Write(w) => {
                let op = match w.base {
                    None => Op::Create(w.record),
                    Some(base) => Op::Replace {
                        base: base.version,
                        record: w.record,
                        no_cas: w.purpose == WritePurpose::Release
                            && mutation == Some(Mutation::ReleaseWithoutCas),
                    },
                };
                self.send(node, el, inc, op, true);
            }
        }
        let Some(d) = self.nodes[node].drivers[el].as_mut() else {
            return;
        };
        if d.pending.is_some() {
            wait = d.machine.wake_while_in_flight();
        }
        d.generation += 1;
        let generation = d.generation;
        if d.pending.is_none() && d.parties.is_empty() && d.machine.is_idle() {
            // The task exits; a later campaign starts a new one.
            self.nodes[node].drivers[el] = None;
            return;
        }
        if let Some(until) = wait.filter(|u| *u > now) {
            let at = self.real(node, until) + Duration::from_micros(1);
            let delay = at.saturating_sub(self.now).max(Duration::from_micros(1));
            self.at(
                delay,
                Ev::Wake {
                    node,
                    el,
                    inc,
                    generation,
                },
            );
        }
    }

    fn send(&mut self, node: usize, el: usize, inc: u64, op: Op, write: bool) {
        // Reads get even ids, writes odd ones.
        self.next_id += 1;
        let req = self.next_id * 2 + u64::from(write);
        let started = self.local(node);
        if let Some(d) = self.nodes[node].drivers[el].as_mut() {
            d.pending = Some(req);
            d.started = started;
        }
        let limit = self.cfg.timing.renew_deadline.div_f64(self.nodes[node].rate);
        self.at(limit, Ev::Timeout { node, el, inc, req });
        if self.nodes[node].partition != Partition::Full {
            let mut lat = self.latency(node);
            let queueing = self.nodes[node].queueing;
            if queueing > Duration::ZERO && self.rng.random_bool(0.3) {
                lat += queueing.mul_f64(self.rng.random_range(0.0..1.0));
            }
            self.at(
                lat,
                Ev::Arrive {
                    node,
                    el,
                    inc,
                    req,
                    op,
                },
            );
        }
    }

    fn state_of(&self, el: usize) -> LockState<Raw> {
        match &self.objects[el] {
            None => LockState::Missing,
            Some((v, r)) => LockState::Present(Observed {
                record: Some(r.clone()),
                version: v.to_string(),
                raw: (),
            }),
        }
    }

    fn arrive(&mut self, node: usize, el: usize, inc: u64, req: u64, op: Op) {
        let burst = self.nodes[node].burst.filter(|_| self.rng.random_bool(0.5));
        let write = !matches!(op, Op::Get);
        let failure: Option<LockFailure> = match burst {
            Some(Burst::Conflict) if write => Some(LockFailure::Conflict),
            Some(Burst::TooMany) => Some(LockFailure::Transient {
                retry_after: Some(Duration::from_secs(1)),
                cause: "429 Too Many Requests".into(),
            }),
            Some(Burst::Internal) => Some(LockFailure::transient("500 Internal Server Error")),
            _ => None,
        };
        let answer = match failure {
            Some(f) if write => Answer::Write(Err(f)),
            Some(f) => Answer::Read(Err(f)),
            None => {
                let a = self.apply(el, op);
                if burst == Some(Burst::AppliedTimeout) {
                    let f = LockFailure::transient("504 Gateway Timeout");
                    if write {
                        Answer::Write(Err(f))
                    } else {
                        Answer::Read(Err(f))
                    }
                } else {
                    a
                }
            }
        };
        if self.nodes[node].partition == Partition::None {
            let lat = self.latency(node);
            self.at(
                lat,
                Ev::Answer {
                    node,
                    el,
                    inc,
                    req,
                    answer,
                },
            );
        }
    }

    /// The API server: resourceVersion compare-and-swap, 409 and 404 as the real one.
    fn apply(&mut self, el: usize, op: Op) -> Answer {
        match op {
            Op::Get => Answer::Read(Ok(self.state_of(el))),
            Op::Create(record) => {
                if self.objects[el].is_some() {
                    return Answer::Write(Err(LockFailure::Conflict));
                }
                self.store(el, record)
            }
            Op::Replace { base, record, no_cas } => match &self.objects[el] {
                None => Answer::Write(Err(LockFailure::NotFound)),
                Some((v, _)) if !no_cas && v.to_string() != base => Answer::Write(Err(LockFailure::Conflict)),
                Some(_) => self.store(el, record),
            },
        }
    }

    fn store(&mut self, el: usize, record: LeaderRecord) -> Answer {
        self.rv += 1;
        self.objects[el] = Some((self.rv, record));
        let state = self.state_of(el);
        for node in 0..self.nodes.len() {
            self.watch_event(node, el, state.clone());
        }
        let LockState::Present(o) = state else {
            unreachable!("just stored")
        };
        Answer::Write(Ok(o))
    }

    fn watch_event(&mut self, node: usize, el: usize, state: LockState<Raw>) {
        let n = &self.nodes[node];
        let Some(inc) = n.broker else { return };
        if n.drivers[el].is_none() || n.partition != Partition::None {
            return;
        }
        let not_before = match n.watch {
            WatchFault::Gap => return,
            WatchFault::Stalled(until) => until,
            WatchFault::Ok => Duration::ZERO,
        };
        let lat = self.latency(node);
        let at = (self.now + lat)
            .max(not_before)
            .max(self.nodes[node].watch_fifo[el] + Duration::from_nanos(1));
        self.nodes[node].watch_fifo[el] = at;
        let delay = at - self.now;
        self.at(delay, Ev::Watch { node, el, inc, state });
    }

    /// A watch re-lists (after a gap, a partition, or when a task starts).
    fn relist(&mut self, node: usize, el: usize) {
        let state = self.state_of(el);
        self.watch_event(node, el, state);
    }

    fn answer(&mut self, node: usize, el: usize, inc: u64, req: u64, answer: Answer) {
        let now = self.local(node);
        if self.nodes[node].broker != Some(inc) {
            return;
        }
        let Some(d) = self.nodes[node].drivers[el].as_mut() else {
            return;
        };
        if d.pending != Some(req) {
            return;
        }
        d.pending = None;
        match answer {
            Answer::Read(r) => d.machine.read_done(now, r),
            Answer::Write(r) => {
                let started = d.started;
                d.machine.write_done(now, started, r)
            }
        }
        self.drive(node, el);
    }

    /// Hands the machine's notifications to the apps' sockets.
    fn deliver(&mut self, node: usize, el: usize) {
        let Some(d) = self.nodes[node].drivers[el].as_mut() else {
            return;
        };
        let notes = d.machine.take_notifications();
        let parties = d.parties.clone();
        for n in notes {
            let to: Vec<(PartyId, usize)> = match &n {
                // The simulated API never refuses (no RBAC here).
                Notification::View(_) | Notification::Refused { .. } => parties.clone(),
                Notification::Elected { party, .. }
                | Notification::Resumed { party, .. }
                | Notification::Renewed { party, .. }
                | Notification::Lost { party, .. }
                | Notification::Jeopardy { party, .. } => {
                    parties.iter().filter(|(p, _)| p == party).copied().collect()
                }
            };
            for (party, app) in to {
                self.send_to_app(app, party, n.clone());
            }
        }
    }

    fn send_to_app(&mut self, app: usize, party: PartyId, n: Notification) {
        let lat = if self.apps[app].prompt {
            Duration::from_micros(self.rng.random_range(10..2000))
        } else {
            ms(self.rng.random_range(0..3000))
        };
        // A socket is FIFO: strictly after what it carries already.
        let at = (self.now + lat).max(self.apps[app].fifo + Duration::from_nanos(1));
        self.apps[app].fifo = at;
        let delay = at - self.now;
        self.at(delay, Ev::ToApp { app, party, n });
    }

    fn broker_receives(&mut self, node: usize, inc: u64, app: usize, party: PartyId, msg: AppMsg) {
        if self.nodes[node].broker != Some(inc) {
            return;
        }
        let el = self.apps[app].el;
        if self.nodes[node].drivers[el].is_none() {
            self.nodes[node].drivers[el] = Some(Driver {
                machine: Contender::new(self.cfg.timing),
                pending: None,
                started: self.local(node),
                generation: 0,
                parties: Vec::new(),
            });
            self.relist(node, el);
        }
        let identity = self.apps[app].identity.clone();
        let d = self.nodes[node].drivers[el].as_mut().expect("just made");
        match msg {
            AppMsg::Join { claim } => {
                if d.machine
                    .join(party, Candidacy::new(identity).claim(claim), None)
                    .is_err()
                {
                    // Identity in use (a restarted container racing its predecessor's close):
                    // the app tries again later.
                    self.at(ms(500), Ev::Reconnect { app });
                    self.apps[app].conn = None;
                } else {
                    d.parties.push((party, app));
                    if let Some(v) = d.machine.view().cloned() {
                        self.send_to_app(app, party, Notification::View(v));
                    }
                }
            }
            AppMsg::Observe => d.parties.push((party, app)),
            AppMsg::Leave { farewell } => {
                if d.parties
                    .iter()
                    .any(|(p, a)| *p == party && self.apps[*a].candidate)
                {
                    d.machine.remove_candidate(party, StepDown::Resigned, farewell);
                }
                self.deliver(node, el);
                if let Some(d) = self.nodes[node].drivers[el].as_mut() {
                    d.parties.retain(|(p, _)| *p != party);
                }
            }
        }
        self.drive(node, el);
    }

    fn app_receives(&mut self, app: usize, party: PartyId, n: Notification) {
        let a = &self.apps[app];
        if !a.alive || a.conn.map(|c| c.0) != Some(party) {
            return;
        }
        let node = a.node;
        let prompt = a.prompt;
        let result = match n {
            Notification::Elected {
                term, valid_until, ..
            } => {
                self.apps[app].guarantee = Some(valid_until);
                self.apps[app].last_term = Some(term);
                let until = (!prompt).then(|| self.real(node, valid_until));
                self.note(format!("app {app} elected term {term}"));
                self.oracle.start(self.now, app, term, until, Start::Elected)
            }
            Notification::Resumed {
                term, valid_until, ..
            } => {
                self.apps[app].guarantee = Some(valid_until);
                let claimed = self.apps[app].claimed.take();
                let until = (!prompt).then(|| self.real(node, valid_until));
                self.note(format!("app {app} resumed term {term} (claimed {claimed:?})"));
                self.oracle
                    .start(self.now, app, term, until, Start::Resumed { claimed })
            }
            Notification::Renewed { valid_until, .. } => {
                self.apps[app].guarantee = Some(valid_until);
                if !prompt {
                    let until = self.real(node, valid_until);
                    self.oracle.cap(app, until);
                }
                Ok(())
            }
            Notification::Lost { term, reason, .. } => {
                self.apps[app].claimed = None;
                self.note(format!("app {app} lost term {term} ({reason:?})"));
                self.oracle.lost(app);
                Ok(())
            }
            Notification::Jeopardy { valid_until, .. } => {
                let until = self.real(node, valid_until);
                self.oracle.cap(app, until);
                Ok(())
            }
            Notification::View(_) | Notification::Refused { .. } => Ok(()),
        };
        if let Err(v) = result {
            self.violation = Some(v);
        }
    }

    /// The app's connection ended (its broker went away): a leader goes on in jeopardy until
    /// its guarantee, and reconnects to claim it.
    fn eof(&mut self, app: usize, party: PartyId) {
        if self.apps[app].conn.map(|c| c.0) != Some(party) {
            return;
        }
        self.apps[app].conn = None;
        let node = self.apps[app].node;
        if let (Some(term), Some(g)) = (self.oracle.leads(app, self.now), self.apps[app].guarantee) {
            let until = self.real(node, g);
            self.oracle.cap(app, until);
            if until > self.now {
                self.apps[app].claim = Some(Claim { term, valid_until: g });
                self.apps[app].claimed = Some(term);
                self.note(format!("app {app} in jeopardy, term {term}"));
            } else {
                self.oracle.stop(app);
            }
        } else {
            self.oracle.stop(app);
        }
        let d = ms(self.rng.random_range(50..1000));
        self.at(d, Ev::Reconnect { app });
    }

    fn reconnect(&mut self, app: usize) {
        let a = &self.apps[app];
        if !a.alive || a.conn.is_some() {
            return;
        }
        let node = a.node;
        let Some(inc) = self.nodes[node].broker else {
            self.at(ms(500), Ev::Reconnect { app });
            return;
        };
        self.next_id += 1;
        let party = self.next_id;
        let now = self.local(node);
        let a = &mut self.apps[app];
        a.conn = Some((party, inc));
        let msg = if !a.candidate {
            AppMsg::Observe
        } else {
            // A claim whose guarantee has passed is dropped: the client has given up.
            let claim = a.claim.take().filter(|c| c.valid_until > now);
            if claim.is_none() {
                a.claimed = None;
            }
            AppMsg::Join { claim }
        };
        let d = Duration::from_micros(self.rng.random_range(10..2000));
        self.at(
            d,
            Ev::ToBroker {
                node,
                inc,
                app,
                party,
                msg,
            },
        );
    }

    fn leave(&mut self, app: usize, farewell: Farewell) {
        self.oracle.stop(app);
        if let Some((party, inc)) = self.apps[app].conn.take() {
            let node = self.apps[app].node;
            let d = Duration::from_micros(self.rng.random_range(10..2000));
            self.at(
                d,
                Ev::ToBroker {
                    node,
                    inc,
                    app,
                    party,
                    msg: AppMsg::Leave { farewell },
                },
            );
        }
    }

    fn crash_broker(&mut self, node: usize, handoff: bool) {
        if self.nodes[node].broker.is_none() {
            return;
        }
        if handoff {
            for el in 0..self.cfg.elections {
                if let Some(d) = self.nodes[node].drivers[el].as_mut() {
                    d.machine.abandon();
                }
                self.deliver(node, el);
            }
        }
        self.nodes[node].broker = None;
        for d in self.nodes[node].drivers.iter_mut() {
            *d = None;
        }
        for app in 0..self.apps.len() {
            if self.apps[app].node == node
                && let Some((party, _)) = self.apps[app].conn
            {
                let at = self.now.max(self.apps[app].fifo) + Duration::from_micros(10);
                let delay = at - self.now;
                self.at(delay, Ev::Eof { app, party });
            }
        }
    }

    fn restart(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if n.broker.is_some() {
            return;
        }
        n.broker = Some(n.incarnations);
        n.incarnations += 1;
        n.watch_fifo.iter_mut().for_each(|f| *f = Duration::ZERO);
    }

    fn fault(&mut self) {
        if self.healed
            || self
                .cfg
                .max_fault_actions
                .is_some_and(|m| self.fault_actions >= m)
        {
            return;
        }
        self.fault_actions += 1;
        let r = &mut self.fault_rng;
        let node = r.random_range(0..self.cfg.nodes);
        let kind = r.random_range(0..18);
        let what = match kind {
            0 => {
                self.nodes[node].partition = Partition::Full;
                "partitioned".to_string()
            }
            1 => {
                self.nodes[node].partition = Partition::OneWay;
                "partitioned one way (requests apply, answers lost)".to_string()
            }
            2 => {
                self.nodes[node].partition = Partition::None;
                for el in 0..self.cfg.elections {
                    self.relist(node, el);
                }
                "partition healed".to_string()
            }
            3 => {
                let max = self.fault_rng.random_range(50..25_000);
                self.nodes[node].extra_latency = ms(max);
                format!("latency up to {max} ms")
            }
            4 => {
                self.nodes[node].extra_latency = Duration::ZERO;
                "latency cleared".to_string()
            }
            5 => {
                let b = [
                    Burst::Conflict,
                    Burst::TooMany,
                    Burst::Internal,
                    Burst::AppliedTimeout,
                ][self.fault_rng.random_range(0..4)];
                self.nodes[node].burst = Some(b);
                format!("error burst {b:?}")
            }
            6 => {
                self.nodes[node].burst = None;
                "errors cleared".to_string()
            }
            7 => {
                let until = self.now + ms(self.fault_rng.random_range(500..30_000));
                self.nodes[node].watch = WatchFault::Stalled(until);
                format!("watch stalled until {:.3}s", until.as_secs_f64())
            }
            8 => {
                self.nodes[node].watch = WatchFault::Gap;
                "watch dropping events".to_string()
            }
            9 => {
                self.nodes[node].watch = WatchFault::Ok;
                for el in 0..self.cfg.elections {
                    self.relist(node, el);
                }
                "watch re-listed".to_string()
            }
            10 | 11 => {
                let handoff = kind == 11;
                self.crash_broker(node, handoff);
                let back = ms(self.fault_rng.random_range(100..20_000));
                self.at(back, Ev::Restart { node });
                format!(
                    "broker {} ({}), back in {back:?}",
                    if handoff { "handed off" } else { "killed" },
                    self.nodes[node].incarnations
                )
            }
            12 | 13 => {
                // An app on this node crashes (12) or resigns (13); a resigned one may campaign again.
                let on: Vec<usize> = (0..self.apps.len())
                    .filter(|a| self.apps[*a].alive && self.apps[*a].node == node)
                    .collect();
                if on.is_empty() {
                    return self.next_fault();
                }
                let app = on[self.fault_rng.random_range(0..on.len())];
                if kind == 12 {
                    self.apps[app].alive = false;
                    self.leave(app, Farewell::Silent);
                    format!("app {app} crashed")
                } else if self.apps[app].conn.is_some() {
                    self.leave(app, Farewell::Tell);
                    self.at(ms(2000), Ev::Reconnect { app });
                    format!("app {app} resigned")
                } else {
                    return self.next_fault();
                }
            }
            14 => {
                let el = self.fault_rng.random_range(0..self.cfg.elections);
                let candidate = self.fault_rng.random_bool(0.8);
                let prompt = self.fault_rng.random_bool(0.8);
                let app = self.new_app(node, el, candidate, prompt, None, None);
                format!("app {app} starts (candidate {candidate}, prompt {prompt})")
            }
            15 => {
                // A container restarts with its predecessor's identity on the same node and
                // replays a stale persisted claim (bad input the broker must refuse unless the
                // record confirms it).
                let led: Vec<usize> = (0..self.apps.len())
                    .filter(|a| self.apps[*a].node == node && self.apps[*a].last_term.is_some())
                    .collect();
                if led.is_empty() {
                    return self.next_fault();
                }
                let old = led[self.fault_rng.random_range(0..led.len())];
                // One process per identity: its current incarnation stops first.
                for a in 0..self.apps.len() {
                    if self.apps[a].alive && self.apps[a].identity == self.apps[old].identity {
                        self.apps[a].alive = false;
                        self.leave(a, Farewell::Silent);
                    }
                }
                let last = self.apps[old].last_term.unwrap_or(0);
                let stale = if last > 0 { last - 1 } else { last + 1 };
                let claim = Claim {
                    term: stale,
                    valid_until: self.local(node) + self.cfg.timing.renew_deadline.mul_f64(0.9),
                };
                let (el, identity) = (self.apps[old].el, self.apps[old].identity.clone());
                let app = self.new_app(node, el, true, true, Some(identity), Some((claim, stale)));
                format!("app {old} restarted as app {app}, replaying a claim on term {stale}")
            }
            16 => {
                let max = self.fault_rng.random_range(1..60);
                self.nodes[node].queueing = Duration::from_secs(max);
                format!("API server queues requests up to {max} s")
            }
            _ => {
                let n = &mut self.nodes[node];
                n.partition = Partition::None;
                n.queueing = Duration::ZERO;
                n.extra_latency = Duration::ZERO;
                n.burst = None;
                n.watch = WatchFault::Ok;
                for el in 0..self.cfg.elections {
                    self.relist(node, el);
                }
                "all faults cleared".to_string()
            }
        };
        self.note(format!("node {node}: {what}"));
        self.next_fault();
    }

    fn next_fault(&mut self) {
        let d = ms(self.fault_rng.random_range(100..4000));
        self.at(d, Ev::Fault);
    }

    fn heal(&mut self) {
        self.healed = true;
        self.note("faults heal".to_string());
        for node in 0..self.cfg.nodes {
            let n = &mut self.nodes[node];
            n.partition = Partition::None;
            n.extra_latency = Duration::ZERO;
            n.queueing = Duration::ZERO;
            n.burst = None;
            n.watch = WatchFault::Ok;
            self.restart(node);
            for el in 0..self.cfg.elections {
                self.relist(node, el);
            }
        }
        for el in 0..self.cfg.elections {
            let any = self.apps.iter().any(|a| a.el == el && a.alive && a.candidate);
            if !any {
                self.new_app(0, el, true, true, None, None);
            }
        }
        for app in 0..self.apps.len() {
            if self.apps[app].alive && self.apps[app].conn.is_none() {
                self.at(ms(10), Ev::Reconnect { app });
            }
        }
        let t = self.cfg.timing;
        let bound = Self::liveness_bound(t);
        self.at(bound, Ev::Check);
    }

    /// How long after the faults heal each election must have one leader: a lease for a dead
    /// holder's record to expire, a renew deadline for requests in flight to end, a retry
    /// period of back-off and one of watch and socket latency.
    fn liveness_bound(t: ElectionTiming) -> Duration {
        t.lease_duration + t.renew_deadline + t.retry_period * 2 + Duration::from_secs(5)
    }

    /// Liveness: after the faults healed, each election has exactly one leader.
    fn check_liveness(&mut self) {
        self.oracle.checks += 1;
        for el in 0..self.cfg.elections {
            let leaders: Vec<usize> = (0..self.apps.len())
                .filter(|a| {
                    self.apps[*a].el == el && self.apps[*a].alive && self.oracle.leads(*a, self.now).is_some()
                })
                .collect();
            if leaders.len() != 1 {
                self.violation = Some(format!(
                    "liveness: election {el} has leaders {leaders:?} {:?} after the faults healed",
                    Self::liveness_bound(self.cfg.timing)
                ));
                return;
            }
        }
        // Done: drop what remains.
        self.queue.clear();
    }
}
