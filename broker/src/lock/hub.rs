//! The broker's lock watches, scoped to what its elections need, fanned out by object name.
//!
//! Each election subscribes to its object's name and gets a `tokio::sync::watch` receiver that
//! always holds the latest [`LockState`]: a slow election never blocks a watch and never sees
//! stale intermediate states pile up.
//!
//! A namespace watch delivers every lock write in the namespace, the broker's or not; in a
//! namespace shared by many nodes most of them are discarded here. So the scope follows
//! interest, per (lock kind, namespace):
//! - while the broker has at most [`WatchHub::name_watch_limit`] elections there, it watches
//!   each lock object by name (a `metadata.name=` field selector);
//! - above that it opens one namespace watch instead, and goes back to watches by name only once
//!   its elections there fall to half the limit (so a count around the limit does not flap).
//!
//! Moving between scopes never loses the latest state: the new watch starts with its own
//! list (`Synced`), and a subscriber's state keeps coming from the old watch until that list
//! has been applied to it; only then is the old watch stopped. Each subscriber is fed by one
//! watch at a time (its `source`), so events of a watch being retired cannot overwrite what
//! the new one delivered. When the last election of a namespace leaves, its watches stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::watch;

use super::{Backends, RawObject, WatchEvent};
use crate::election::LockState;
use elector_client::protocol::LockKind;

type Key = (LockKind, String);

/// Elections per (kind, namespace) up to which a broker watches its lock objects one by one.
///
/// From `bench cluster` (30 brokers, 60 elections of 3 candidates, 6 per broker): with
/// namespace watches a broker received 30 events/s in one shared namespace, 27 of them for
/// other nodes' elections (6 of 9 with 10 namespaces); watched by name it received its own 3
/// and the cluster's total fell from 900 (270) to 90 events/s, at one open watch per
/// (broker, election). Each watch by name is one more connection to the API server (kube-rs
/// watches over HTTP/1.1), so the limit bounds them per namespace; a node with more elections
/// than that in one namespace watches the namespace, where a larger share of what it receives
/// is its own.
pub const DEFAULT_NAME_WATCH_LIMIT: usize = 16;

type Sender = watch::Sender<LockState<RawObject>>;

#[derive(Debug)]
struct Subscriber {
    tx: Sender,
    /// The watch whose events reach this subscriber (`None` until one has synced).
    source: Option<u64>,
}

#[derive(Debug)]
struct RunningWatch {
    id: u64,
    synced: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Names,
    Namespace,
}

/// The watches of one (kind, namespace).
#[derive(Debug)]
struct NamespaceWatches {
    subscribers: HashMap<String, Subscriber>,
    scope: Scope,
    namespace_watch: Option<RunningWatch>,
    name_watches: HashMap<String, RunningWatch>,
}

#[derive(Debug, Default)]
struct State {
    namespaces: HashMap<Key, NamespaceWatches>,
    next_id: u64,
}

/// The watch multiplexer of one broker.
#[derive(Debug, Clone)]
pub struct WatchHub {
    backends: Backends,
    name_watch_limit: usize,
    inner: Arc<Mutex<State>>,
}

impl WatchHub {
    pub fn new(backends: Backends) -> Self {
        Self::with_name_watch_limit(backends, DEFAULT_NAME_WATCH_LIMIT)
    }

    /// A hub that watches objects by name while a namespace has at most `limit` subscribers
    /// (0: always the whole namespace).
    pub fn with_name_watch_limit(backends: Backends, limit: usize) -> Self {
        WatchHub {
            backends,
            name_watch_limit: limit,
            inner: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Elections per (kind, namespace) up to which objects are watched by name.
    pub fn name_watch_limit(&self) -> usize {
        self.name_watch_limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Critical sections only insert/remove/send: a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many watches are open (namespace watches and watches by name).
    pub fn open_watches(&self) -> usize {
        self.lock()
            .namespaces
            .values()
            .map(|n| n.name_watches.len() + usize::from(n.namespace_watch.is_some()))
            .sum()
    }

    /// (namespace watches, watches by name) open for one kind and namespace.
    pub fn watches_of(&self, kind: LockKind, namespace: &str) -> (usize, usize) {
        self.lock()
            .namespaces
            .get(&(kind, namespace.to_string()))
            .map_or((0, 0), |n| {
                (usize::from(n.namespace_watch.is_some()), n.name_watches.len())
            })
    }

    /// Subscribes to one lock object. A new subscriber of a name starts `Unknown`: its watch by
    /// name fills it in when that watch has listed; under a namespace watch that has synced
    /// already the hub cannot tell a missing object from one it never kept (it keeps state
    /// only for subscribed names), so the election reads the object once and the watch's
    /// changes (and re-syncs) update the receiver from then on. Later subscribers of the same
    /// name share the first one's receiver state.
    pub fn subscribe(
        &self,
        kind: LockKind,
        namespace: &str,
        name: &str,
    ) -> watch::Receiver<LockState<RawObject>> {
        let key = (kind, namespace.to_string());
        let mut state = self.lock();
        let ns = state
            .namespaces
            .entry(key.clone())
            .or_insert_with(|| NamespaceWatches {
                subscribers: HashMap::new(),
                scope: Scope::Names,
                namespace_watch: None,
                name_watches: HashMap::new(),
            });
        if let Some(s) = ns.subscribers.get(name) {
            return s.tx.subscribe();
        }
        // Under a synced namespace watch the object's state is not known here (the hub keeps
        // state only for subscribed names), so start Unknown, let the election read it once,
        // and deliver the namespace watch's events from now on.
        let source = ns
            .namespace_watch
            .as_ref()
            .filter(|w| w.synced && ns.scope == Scope::Namespace)
            .map(|w| w.id);
        let (tx, rx) = watch::channel(LockState::Unknown);
        ns.subscribers.insert(name.to_string(), Subscriber { tx, source });
        self.rescope(&mut state, &key);
        rx
    }

    /// Drops a subscription; the namespace's watches stop with its last subscriber.
    pub fn unsubscribe(&self, kind: LockKind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_string());
        let mut state = self.lock();
        let Some(ns) = state.namespaces.get_mut(&key) else {
            return;
        };
        ns.subscribers.remove(name);
        ns.name_watches.remove(name);
        if ns.subscribers.is_empty() {
            state.namespaces.remove(&key);
        } else {
            self.rescope(&mut state, &key);
        }
    }

    /// Chooses the scope for the namespace's subscriber count and starts the watches it needs.
    /// Old watches are stopped by the new ones' `Synced` (see [`Self::apply`]).
    fn rescope(&self, state: &mut State, key: &Key) {
        let limit = self.name_watch_limit;
        let State { namespaces, next_id } = state;
        let Some(ns) = namespaces.get_mut(key) else {
            return;
        };
        let n = ns.subscribers.len();
        ns.scope = match ns.scope {
            Scope::Names if n > limit => Scope::Namespace,
            Scope::Namespace if n <= limit / 2 => Scope::Names,
            same => same,
        };
        match ns.scope {
            Scope::Namespace => {
                if ns.namespace_watch.is_none() {
                    *next_id += 1;
                    ns.namespace_watch = Some(self.spawn_watch(key.clone(), *next_id, None));
                }
            }
            Scope::Names => {
                // A namespace watch that never synced feeds nobody: stop it now.
                if ns.namespace_watch.as_ref().is_some_and(|w| !w.synced) {
                    ns.namespace_watch = None;
                }
                for name in ns.subscribers.keys() {
                    if !ns.name_watches.contains_key(name) {
                        *next_id += 1;
                        let watch = self.spawn_watch(key.clone(), *next_id, Some(name.clone()));
                        ns.name_watches.insert(name.clone(), watch);
                    }
                }
            }
        }
    }

    /// Applies one event of watch `id` (of `name`, or of the whole namespace) to the state.
    fn apply(state: &mut State, key: &Key, id: u64, name: Option<&str>, event: WatchEvent) {
        let Some(ns) = state.namespaces.get_mut(key) else {
            return;
        };
        let current = match name {
            Some(n) => ns.name_watches.get(n).is_some_and(|w| w.id == id),
            None => ns.namespace_watch.as_ref().is_some_and(|w| w.id == id),
        };
        if !current {
            return;
        }
        match event {
            WatchEvent::Synced(objects) => {
                let mut present: HashMap<String, _> = objects.into_iter().collect();
                match name {
                    None => {
                        if let Some(w) = ns.namespace_watch.as_mut() {
                            w.synced = true;
                        }
                        if ns.scope != Scope::Namespace {
                            return;
                        }
                        // Every subscriber moves to this watch; the watches by name stop.
                        for (n, s) in &mut ns.subscribers {
                            s.source = Some(id);
                            s.tx.send_replace(
                                present.remove(n).map_or(LockState::Missing, LockState::Present),
                            );
                        }
                        ns.name_watches.clear();
                    }
                    Some(n) => {
                        if let Some(w) = ns.name_watches.get_mut(n) {
                            w.synced = true;
                        }
                        if let Some(s) = ns.subscribers.get_mut(n) {
                            s.source = Some(id);
                            s.tx.send_replace(
                                present.remove(n).map_or(LockState::Missing, LockState::Present),
                            );
                        }
                        // The namespace watch stops once no subscriber is fed by it.
                        if ns.scope == Scope::Names
                            && let Some(nw) = &ns.namespace_watch
                            && !ns.subscribers.values().any(|s| s.source == Some(nw.id))
                        {
                            ns.namespace_watch = None;
                        }
                    }
                }
            }
            WatchEvent::Applied(n, obj) => {
                if let Some(s) = ns.subscribers.get(&n)
                    && s.source == Some(id)
                {
                    s.tx.send_replace(LockState::Present(obj));
                }
            }
            WatchEvent::Deleted(n) => {
                if let Some(s) = ns.subscribers.get(&n)
                    && s.source == Some(id)
                {
                    s.tx.send_replace(LockState::Missing);
                }
            }
        }
    }

    fn spawn_watch(&self, key: Key, id: u64, name: Option<String>) -> RunningWatch {
        let backend = self.backends.for_kind(key.0);
        let mut stream = match &name {
            Some(n) => backend.watch_object(&key.1, n),
            None => backend.watch_namespace(&key.1),
        };
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
                Self::apply(&mut state, &key, id, name.as_deref(), event);
            }
        });
        RunningWatch {
            id,
            synced: false,
            task,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::election::record::LeaderRecord;
    use std::time::Duration;

    fn record(holder: &str) -> LeaderRecord {
        LeaderRecord {
            holder_identity: holder.into(),
            ..Default::default()
        }
    }

    async fn until(mut f: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within 10 s");
    }

    fn holder(rx: &watch::Receiver<LockState<RawObject>>) -> Option<String> {
        match &*rx.borrow() {
            LockState::Present(o) => o.record.as_ref().map(|r| r.holder_identity.clone()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn few_elections_are_watched_by_name_many_by_namespace_with_hysteresis() {
        let backends = Backends::memory();
        let hub = WatchHub::with_name_watch_limit(backends, 4);
        let mut rx = Vec::new();
        for i in 0..4 {
            rx.push(hub.subscribe(LockKind::Lease, "ns", &format!("e{i}")));
        }
        assert_eq!(hub.watches_of(LockKind::Lease, "ns"), (0, 4));
        // A fifth election: one namespace watch; once it synced the watches by name stop.
        rx.push(hub.subscribe(LockKind::Lease, "ns", "e4"));
        until(|| hub.watches_of(LockKind::Lease, "ns") == (1, 0)).await;
        // Down to 3 (above half the limit): still the namespace watch.
        hub.unsubscribe(LockKind::Lease, "ns", "e4");
        hub.unsubscribe(LockKind::Lease, "ns", "e3");
        assert_eq!(hub.watches_of(LockKind::Lease, "ns"), (1, 0));
        // Down to 2 (half the limit): watches by name again, then the namespace watch stops.
        hub.unsubscribe(LockKind::Lease, "ns", "e2");
        until(|| hub.watches_of(LockKind::Lease, "ns") == (0, 2)).await;
        // Another namespace and kind are scoped on their own.
        let _other = hub.subscribe(LockKind::Endpoints, "ns", "e0");
        assert_eq!(hub.watches_of(LockKind::Endpoints, "ns"), (0, 1));
        assert_eq!(hub.open_watches(), 3);
        for name in ["e0", "e1"] {
            hub.unsubscribe(LockKind::Lease, "ns", name);
        }
        hub.unsubscribe(LockKind::Endpoints, "ns", "e0");
        assert_eq!(hub.open_watches(), 0);
    }

    #[tokio::test]
    async fn a_limit_of_zero_watches_the_namespace() {
        let hub = WatchHub::with_name_watch_limit(Backends::memory(), 0);
        let _rx = hub.subscribe(LockKind::Lease, "ns", "e0");
        assert_eq!(hub.watches_of(LockKind::Lease, "ns"), (1, 0));
    }

    #[tokio::test]
    async fn moving_between_scopes_keeps_the_latest_state() {
        let backends = Backends::memory();
        let lease = backends.lease.clone();
        let hub = WatchHub::with_name_watch_limit(backends, 2);
        let write = |name: &str, who: &str| {
            let lease = lease.clone();
            let (name, who) = (name.to_string(), who.to_string());
            async move {
                match lease.get("ns", &name).await.unwrap() {
                    LockState::Present(base) => {
                        lease.replace("ns", &name, &base, &record(&who)).await.unwrap()
                    }
                    _ => lease.create("ns", &name, &record(&who)).await.unwrap(),
                };
            }
        };
        write("a", "x1").await;
        let a = hub.subscribe(LockKind::Lease, "ns", "a");
        until(|| holder(&a).as_deref() == Some("x1")).await;
        let b = hub.subscribe(LockKind::Lease, "ns", "b");
        until(|| matches!(*b.borrow(), LockState::Missing)).await;
        // Names -> namespace, with writes on both sides of the move.
        write("a", "x2").await;
        let c = hub.subscribe(LockKind::Lease, "ns", "c");
        write("b", "y1").await;
        write("a", "x3").await;
        until(|| hub.watches_of(LockKind::Lease, "ns") == (1, 0)).await;
        write("c", "z1").await;
        until(|| holder(&a).as_deref() == Some("x3")).await;
        until(|| holder(&b).as_deref() == Some("y1")).await;
        until(|| holder(&c).as_deref() == Some("z1")).await;
        // Namespace -> names (down to half the limit: 1), writes around the move.
        hub.unsubscribe(LockKind::Lease, "ns", "b");
        write("a", "x4").await;
        hub.unsubscribe(LockKind::Lease, "ns", "c");
        write("a", "x5").await;
        until(|| hub.watches_of(LockKind::Lease, "ns") == (0, 1)).await;
        until(|| holder(&a).as_deref() == Some("x5")).await;
        write("a", "x6").await;
        until(|| holder(&a).as_deref() == Some("x6")).await;
        // Only the name watch of "a" feeds it now; deleting others changes nothing for it.
        write("b", "y2").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(holder(&a).as_deref(), Some("x6"));
    }
}
