//! Kubernetes Events on leadership changes: `events.k8s.io/v1` Events about the lock object
//! (the Lease or the Endpoints), as client-go's leader election records them, so that
//! `kubectl describe lease NAME` and `kubectl get events` show the history of an election.
//!
//! What is recorded, with reason `LeaderElection` (client-go's), reporting controller
//! [`REPORTING_CONTROLLER`] and reporting instance the broker's node:
//! - `Normal`, action `BecameLeader`: "pod-a became leader (term 4, node n1)";
//! - `Warning`, action `LostLeadership`: "pod-a lost leadership (term 4, node n1): renew_failed"
//!   (or `preempted`);
//! - `Normal`, action `Released`: "pod-a released leadership (term 4, node n1): resigned" (or
//!   `broker_shutdown`).
//!
//! Writes go through kube-runtime's [`Recorder`], one per lock object and holder identity: a
//! repeat of the same change by the same holder on the same lock within kube-runtime's cache
//! window (6 minutes) patches the first Event's `series` (count, last seen) instead of creating
//! another; its note stays the first one's. The `regarding` reference names the lock's kind,
//! namespace, name and uid (what `kubectl describe` selects on), not its `resourceVersion`,
//! which changes with every renewal: kube-runtime compares whole references, so carrying it
//! would defeat the aggregation.
//!
//! # Guarantees
//! - **Elections are never delayed.** An election task only hands a change to a bounded queue
//!   ([`QUEUE_CAPACITY`]) without waiting; when the queue is full the change is dropped and
//!   counted (`elector_kubernetes_events_dropped_total{reason="queue_full"}`). Writes happen on
//!   their own task, each bounded by [`WRITE_TIMEOUT`].
//! - **A flapping election cannot flood the API.** Each lock object has a token bucket: at most
//!   [`BURST`] writes at once, then one per [`REFILL_EVERY`], so in any interval of length `t` a
//!   broker makes at most `BURST + t / REFILL_EVERY` Event writes (creates plus patches) about
//!   one lock. A change that finds the bucket empty is kept as the lock's latest and written
//!   when the next token comes (so the history ends on the current state); the change it
//!   replaces is dropped and counted (`reason="rate_limited"`).
//!
//! # Failure modes
//! A write that fails (a 403 where RBAC lacks the events rule, a 5xx, a timeout) is logged and
//! counted (`reason="write_failed"`), never retried; the election is unaffected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::election::LockState;
use crate::lock::RawObject;
use crate::metrics::Metrics;
use elector_client::protocol::{ElectionName, LockKind, LostReason};

/// `reportingController` of every Event the broker writes.
pub const REPORTING_CONTROLLER: &str = "elector.dev/electord";
/// The Events' reason, as client-go's leader election gives it.
pub const REASON: &str = "LeaderElection";
/// Leadership changes waiting to be written; more are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 256;
/// Event writes about one lock object a broker may make at once.
pub const BURST: u32 = 10;
/// After a burst, one more write about the lock object per this interval.
pub const REFILL_EVERY: Duration = Duration::from_secs(30);
/// How long one Event write may take before it is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A holder's recorder is forgotten after this long unused: kube-runtime aggregates repeats
/// within 6 minutes, so a recorder idle longer has nothing left to aggregate.
const RECORDER_IDLE: Duration = Duration::from_secs(6 * 60);

/// Errors starting the recorder.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("Kubernetes Events need a tokio runtime to run their writer on")]
    NoRuntime,
}

/// What happened to a leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Elected,
    /// Lost against the holder's will (`renew_failed`, `preempted`).
    Lost(LostReason),
    /// Given up (`resigned`, `broker_shutdown`).
    Released(LostReason),
}

impl Change {
    /// The change of a local leader told `lost` with `reason`.
    pub fn of_lost(reason: LostReason) -> Change {
        match reason {
            LostReason::Resigned | LostReason::BrokerShutdown => Change::Released(reason),
            other => Change::Lost(other),
        }
    }

    fn action(self) -> &'static str {
        match self {
            Change::Elected => "BecameLeader",
            Change::Lost(_) => "LostLeadership",
            Change::Released(_) => "Released",
        }
    }

    fn event_type(self) -> EventType {
        match self {
            Change::Lost(_) => EventType::Warning,
            Change::Elected | Change::Released(_) => EventType::Normal,
        }
    }
}

/// The lock object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockRef {
    pub kind: LockKind,
    pub namespace: String,
    pub name: String,
    /// The object's uid, when the broker has read or written it.
    pub uid: Option<String>,
}

impl LockRef {
    /// The lock of `election`, with the uid of the object last seen, if any.
    pub fn of(election: &ElectionName, seen: &LockState<RawObject>) -> LockRef {
        let uid = match seen {
            LockState::Present(o) => match &o.raw {
                RawObject::Lease(l) => l.metadata.uid.clone(),
                RawObject::Endpoints(e) => e.metadata.uid.clone(),
                RawObject::Memory => None,
            },
            LockState::Missing | LockState::Unknown => None,
        };
        LockRef {
            kind: election.lock,
            namespace: election.namespace.clone(),
            name: election.election.clone(),
            uid,
        }
    }

    fn object_reference(&self) -> ObjectReference {
        let (api_version, kind) = match self.kind {
            LockKind::Lease => ("coordination.k8s.io/v1", "Lease"),
            LockKind::Endpoints => ("v1", "Endpoints"),
        };
        ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..Default::default()
        }
    }

    /// Where the lock's token bucket is kept: per object, whatever uid it had when seen.
    fn bucket_key(&self) -> (LockKind, String, String) {
        (self.kind, self.namespace.clone(), self.name.clone())
    }
}

/// One leadership change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadershipChange {
    pub lock: LockRef,
    pub identity: String,
    pub term: u64,
    pub change: Change,
}

impl LeadershipChange {
    /// The Event's note, e.g. "pod-a became leader (term 4, node n1)".
    pub fn note(&self, node: &str) -> String {
        let who = &self.identity;
        let term = self.term;
        let mut note = match self.change {
            Change::Elected => format!("{who} became leader (term {term}, node {node})"),
            Change::Lost(r) => format!("{who} lost leadership (term {term}, node {node}): {r}"),
            Change::Released(r) => format!("{who} released leadership (term {term}, node {node}): {r}"),
        };
        // The API refuses notes over 1 kB; identities are short, but nothing is guaranteed.
        if note.len() > 1024 {
            let mut end = 1021;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        note
    }
}

enum Message {
    Change(LeadershipChange),
    Flush(oneshot::Sender<()>),
}

/// The election side of the recorder: cheap to clone, never blocks.
#[derive(Clone)]
pub struct LeadershipEvents {
    queue: mpsc::Sender<Message>,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for LeadershipEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadershipEvents")
            .field("queued", &(QUEUE_CAPACITY - self.queue.capacity()))
            .finish()
    }
}

impl LeadershipEvents {
    /// Starts the writer task for the broker on `node`, on the current tokio runtime. It ends
    /// when every handle is dropped.
    pub fn start(
        client: kube::Client,
        node: &str,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<LeadershipEvents, EventsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EventsError::NoRuntime)?;
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer = Writer {
            client,
            reporter: Reporter {
                controller: REPORTING_CONTROLLER.into(),
                instance: Some(node.to_string()),
            },
            node: node.to_string(),
            metrics: metrics.clone(),
            recorders: HashMap::new(),
            buckets: HashMap::new(),
        };
        runtime.spawn(writer.run(rx));
        Ok(LeadershipEvents { queue, metrics })
    }

    /// Queues a change without waiting; a full queue drops it (counted).
    pub fn record(&self, change: LeadershipChange) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(Message::Change(change))
            && let Some(m) = &self.metrics
        {
            m.kubernetes_event_dropped("queue_full");
        }
    }

    /// Queues `identity`'s `change` in `term` of `election`, whose lock was last seen as `seen`.
    pub fn leadership_changed(
        &self,
        election: &ElectionName,
        seen: &LockState<RawObject>,
        identity: &str,
        term: u64,
        change: Change,
    ) {
        self.record(LeadershipChange {
            lock: LockRef::of(election, seen),
            identity: identity.to_string(),
            term,
            change,
        });
    }

    /// Waits (at most `limit`) until every change queued so far has been written or given up:
    /// on shutdown, so that the last `released` Events are not lost with the process.
    pub async fn flush(&self, limit: Duration) {
        let flushed = async {
            let (tx, rx) = oneshot::channel();
            if self.queue.send(Message::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        let _ = tokio::time::timeout(limit, flushed).await;
    }
}

/// A token bucket: `burst` tokens, one more every `refill_every`, never more than `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: u32,
    refill_every: Duration,
    tokens: u32,
    /// When the last token was added (or the bucket last found full).
    refilled_at: Instant,
}

impl TokenBucket {
    pub fn new(burst: u32, refill_every: Duration, now: Instant) -> Self {
        TokenBucket {
            burst,
            refill_every,
            tokens: burst,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if self.tokens >= self.burst {
            self.refilled_at = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.refilled_at);
        let earned = (elapsed.as_nanos() / self.refill_every.as_nanos().max(1)) as u64;
        if earned == 0 {
            return;
        }
        let tokens = (u64::from(self.tokens) + earned).min(u64::from(self.burst));
        self.tokens = tokens as u32;
        self.refilled_at = if self.tokens >= self.burst {
            now
        } else {
            self.refilled_at + self.refill_every * earned as u32
        };
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// When a token will be there.
    pub fn next_token_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens > 0 {
            now
        } else {
            self.refilled_at + self.refill_every
        }
    }

    /// Whether the bucket is full again (nothing to remember about it).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// One lock object's write budget, and its latest change waiting for a token.
struct Budget {
    bucket: TokenBucket,
    deferred: Option<LeadershipChange>,
}

/// The writer task.
struct Writer {
    client: kube::Client,
    reporter: Reporter,
    node: String,
    metrics: Option<Arc<Metrics>>,
    /// One kube-runtime recorder (and its aggregation cache) per lock object and holder, with
    /// when it was last used.
    recorders: HashMap<(LockRef, String), (Recorder, Instant)>,
    buckets: HashMap<(LockKind, String, String), Budget>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        loop {
            let wake = self.next_deferred_at();
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Message::Change(c)) => self.offer(c).await,
                    Some(Message::Flush(done)) => {
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = sleep_until_opt(wake) => self.write_deferred().await,
            }
        }
    }

    fn dropped(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.kubernetes_event_dropped(reason);
        }
    }

    async fn offer(&mut self, change: LeadershipChange) {
        let now = Instant::now();
        self.forget_idle(now);
        let budget = self
            .buckets
            .entry(change.lock.bucket_key())
            .or_insert_with(|| Budget {
                bucket: TokenBucket::new(BURST, REFILL_EVERY, now),
                deferred: None,
            });
        if budget.bucket.try_take(now) {
            // Anything still waiting is older than this change: this one tells the state.
            let superseded = budget.deferred.take().is_some();
            if superseded {
                self.dropped("rate_limited");
            }
            self.write(change).await;
        } else {
            let superseded = budget.deferred.replace(change).is_some();
            if superseded {
                self.dropped("rate_limited");
            }
        }
    }

    fn next_deferred_at(&mut self) -> Option<Instant> {
        let now = Instant::now();
        self.buckets
            .values_mut()
            .filter(|b| b.deferred.is_some())
            .map(|b| b.bucket.next_token_at(now))
            .min()
    }

    async fn write_deferred(&mut self) {
        let now = Instant::now();
        let due: Vec<LeadershipChange> = self
            .buckets
            .values_mut()
            .filter(|b| b.deferred.is_some())
            .filter_map(|b| {
                if b.bucket.try_take(now) {
                    b.deferred.take()
                } else {
                    None
                }
            })
            .collect();
        for change in due {
            self.write(change).await;
        }
    }

    /// Forgets full buckets with nothing waiting, and recorders unused for a while.
    fn forget_idle(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| b.deferred.is_some() || !b.bucket.is_full(now));
        self.recorders
            .retain(|_, (_, used)| now.saturating_duration_since(*used) < RECORDER_IDLE);
    }

    async fn write(&mut self, change: LeadershipChange) {
        let key = (change.lock.clone(), change.identity.clone());
        let (recorder, used) = self.recorders.entry(key.clone()).or_insert_with(|| {
            (
                Recorder::new(self.client.clone(), self.reporter.clone()),
                Instant::now(),
            )
        });
        *used = Instant::now();
        let recorder = recorder.clone();
        let event = Event {
            type_: change.change.event_type(),
            reason: REASON.into(),
            note: Some(change.note(&self.node)),
            action: change.change.action().into(),
            secondary: None,
        };
        let reference = change.lock.object_reference();
        let failure = match tokio::time::timeout(WRITE_TIMEOUT, recorder.publish(&event, &reference)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(crate::lock::kube::error_chain(&e)),
            Err(_) => Some(format!("no answer within {WRITE_TIMEOUT:?}")),
        };
        match failure {
            None => {
                if let Some(m) = &self.metrics {
                    m.kubernetes_events_written.inc();
                }
            }
            Some(why) => {
                tracing::warn!(
                    namespace = %change.lock.namespace, lock = %change.lock.name, identity = %change.identity,
                    "could not record the Kubernetes Event {:?}: {why}", event.note.as_deref().unwrap_or_default()
                );
                self.dropped("write_failed");
                // Its cache may name an Event that is gone: start afresh next time.
                self.recorders.remove(&key);
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, Duration::from_secs(30), t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert_eq!(b.next_token_at(t0), t0 + Duration::from_secs(30));
        assert!(!b.try_take(t0 + Duration::from_secs(29)));
        assert!(b.try_take(t0 + Duration::from_secs(30)));
        assert!(!b.try_take(t0 + Duration::from_secs(31)));
        // Tokens earned while idle never exceed the burst.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.is_full(later));
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_in_any_window_stay_within_burst_plus_refills() {
        // 1000 attempts, one every 100 ms: in every window of length t, at most
        // burst + t / refill_every succeed.
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        let mut b = TokenBucket::new(4, every, t0);
        let granted: Vec<Instant> = (0..1000u32)
            .map(|i| t0 + Duration::from_millis(100) * i)
            .filter(|&t| b.try_take(t))
            .collect();
        assert_eq!(granted.len(), 4 + 99_900 / 5_000, "{granted:?}");
        for (i, &start) in granted.iter().enumerate() {
            for (j, &end) in granted.iter().enumerate().skip(i) {
                let allowed = 4 + (end - start).as_nanos() / every.as_nanos();
                assert!(
                    (j - i + 1) as u128 <= allowed,
                    "{} in {:?}",
                    j - i + 1,
                    end - start
                );
            }
        }
    }

    #[test]
    fn notes_say_who_which_term_where_and_why() {
        let lock = LockRef {
            kind: LockKind::Lease,
            namespace: "demo".into(),
            name: "job".into(),
            uid: Some("u-1".into()),
        };
        let change = |change| LeadershipChange {
            lock: lock.clone(),
            identity: "pod-a".into(),
            term: 4,
            change,
        };
        assert_eq!(
            change(Change::Elected).note("n1"),
            "pod-a became leader (term 4, node n1)"
        );
        let lost = change(Change::of_lost(LostReason::RenewFailed));
        assert_eq!(
            lost.note("n1"),
            "pod-a lost leadership (term 4, node n1): renew_failed"
        );
        assert_eq!(lost.change.event_type(), EventType::Warning);
        let released = change(Change::of_lost(LostReason::BrokerShutdown));
        assert_eq!(
            released.note("n1"),
            "pod-a released leadership (term 4, node n1): broker_shutdown"
        );
        assert_eq!(released.change.action(), "Released");
        let long = LeadershipChange {
            identity: "é".repeat(600),
            ..change(Change::Elected)
        };
        assert!(long.note("n1").len() <= 1024);
        let r = lock.object_reference();
        assert_eq!(
            (r.api_version.as_deref(), r.kind.as_deref(), r.uid.as_deref()),
            (Some("coordination.k8s.io/v1"), Some("Lease"), Some("u-1"))
        );
        assert_eq!(r.resource_version, None, "kept out so repeats aggregate");
    }

    fn counter(metrics: &Metrics, line_prefix: &str) -> u64 {
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// An API server that accepts every Event write and remembers it: (method, path, body).
    type Seen = Arc<std::sync::Mutex<Vec<(String, String, serde_json::Value)>>>;

    fn accepting_api() -> (kube::Client, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let log = log.clone();
            async move {
                let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                    .await
                    .unwrap_or_default();
                let body = serde_json::from_slice(&body).unwrap_or_default();
                log.lock().unwrap().push((method, path, body));
                (
                    axum::http::StatusCode::CREATED,
                    axum::Json(serde_json::json!({
                        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}
                    })),
                )
            }
        });
        (kube::Client::new(app, "default"), seen)
    }

    #[tokio::test(start_paused = true)]
    async fn a_flap_writes_a_burst_then_the_latest_change_when_a_token_comes() {
        let (client, seen) = accepting_api();
        let metrics = Arc::new(Metrics::new());
        let events = LeadershipEvents::start(client, "n1", Some(metrics.clone())).unwrap();
        let lock = LockRef {
            kind: LockKind::Lease,
            namespace: "demo".into(),
            name: "job".into(),
            uid: Some("u-1".into()),
        };
        let change = |identity: &str, term, change| LeadershipChange {
            lock: lock.clone(),
            identity: identity.into(),
            term,
            change,
        };
        for term in 0..30 {
            events.record(change(&format!("pod-{}", term % 2), term, Change::Elected));
        }
        events.record(change("pod-0", 30, Change::Released(LostReason::Resigned)));
        events.flush(Duration::from_secs(5)).await;
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), BURST as usize, "{seen:#?}");
            // Each holder's first "became leader" is created, its repeats patch its series.
            let creates: Vec<&str> = seen
                .iter()
                .filter(|(m, _, _)| m == "POST")
                .map(|(_, _, body)| body["note"].as_str().unwrap_or_default())
                .collect();
            assert_eq!(
                creates,
                [
                    "pod-0 became leader (term 0, node n1)",
                    "pod-1 became leader (term 1, node n1)"
                ]
            );
            assert!(
                seen.iter()
                    .all(|(_, path, _)| path.starts_with("/apis/events.k8s.io/v1/namespaces/demo/events"))
            );
            let (_, _, last) = seen.last().unwrap();
            assert_eq!(last["series"]["count"], 5, "{last}");
        }
        assert_eq!(
            counter(&metrics, "elector_kubernetes_events_written_total "),
            BURST as u64
        );
        // Every change after the burst but the last was dropped; the last waits for a token.
        assert_eq!(
            counter(
                &metrics,
                "elector_kubernetes_events_dropped_total{reason=\"rate_limited\"} "
            ),
            20
        );
        tokio::time::sleep(REFILL_EVERY + Duration::from_secs(1)).await;
        events.flush(Duration::from_secs(5)).await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), BURST as usize + 1);
        let (method, _, body) = seen.last().unwrap();
        assert_eq!(
            (
                method.as_str(),
                body["note"].as_str(),
                body["type"].as_str(),
                body["action"].as_str()
            ),
            (
                "POST",
                Some("pod-0 released leadership (term 30, node n1): resigned"),
                Some("Normal"),
                Some("Released")
            )
        );
        assert_eq!(body["regarding"]["uid"], "u-1");
        assert_eq!(body["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(body["reportingInstance"], "n1");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        // A queue nobody drains, filled past its capacity: `record` returns at once each time.
        let metrics = Arc::new(Metrics::new());
        let (queue, _rx) = mpsc::channel(2);
        let events = LeadershipEvents {
            queue,
            metrics: Some(metrics.clone()),
        };
        let change = LeadershipChange {
            lock: LockRef {
                kind: LockKind::Lease,
                namespace: "d".into(),
                name: "x".into(),
                uid: None,
            },
            identity: "a".into(),
            term: 1,
            change: Change::Elected,
        };
        for _ in 0..5 {
            events.record(change.clone());
        }
        let text = metrics.encode();
        assert!(
            text.contains("elector_kubernetes_events_dropped_total{reason=\"queue_full\"} 3"),
            "{text}"
        );
    }
}
