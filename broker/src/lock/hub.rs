//! One watch per (lock kind, namespace), fanned out to the elections of that namespace by name.
//!
//! Each election subscribes to its object's name and gets a `tokio::sync::watch` receiver that
//! always holds the latest [`LockState`]: a slow election never blocks the watch and never sees
//! stale intermediate states pile up. When the last election of a namespace leaves, its watch is
//! stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::watch;

use super::{Backends, RawObject, WatchEvent};
use crate::election::LockState;
use elector_client::protocol::LockKind;

type Key = (LockKind, String);

#[derive(Debug)]
struct NamespaceWatch {
    subscribers: HashMap<String, watch::Sender<LockState<RawObject>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The watch multiplexer of one broker.
#[derive(Debug, Clone)]
pub struct WatchHub {
    backends: Backends,
    inner: Arc<Mutex<HashMap<Key, NamespaceWatch>>>,
}

impl WatchHub {
    pub fn new(backends: Backends) -> Self {
        WatchHub {
            backends,
            inner: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, NamespaceWatch>> {
        // Critical sections only insert/remove/send: a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many namespace watches are open.
    pub fn open_watches(&self) -> usize {
        self.lock().len()
    }

    /// Subscribes to one lock object. A new subscriber of a name starts `Unknown`, even when
    /// the namespace's watch has synced: the hub keeps state only for subscribed names, so it
    /// cannot tell a missing object from one it never kept. The election reads the object
    /// once; the watch's changes (and its re-syncs) update the receiver from then on. Later
    /// subscribers of the same name share the first one's receiver state.
    pub fn subscribe(
        &self,
        kind: LockKind,
        namespace: &str,
        name: &str,
    ) -> watch::Receiver<LockState<RawObject>> {
        let key = (kind, namespace.to_string());
        let mut map = self.lock();
        let ns = map.entry(key).or_insert_with_key(|key| NamespaceWatch {
            subscribers: HashMap::new(),
            task: self.spawn_watch(key.clone()),
        });
        ns.subscribers
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(LockState::Unknown).0)
            .subscribe()
    }

    /// Drops a subscription; the namespace watch stops with its last subscriber.
    pub fn unsubscribe(&self, kind: LockKind, namespace: &str, name: &str) {
        let key = (kind, namespace.to_string());
        let mut map = self.lock();
        if let Some(ns) = map.get_mut(&key) {
            ns.subscribers.remove(name);
            if ns.subscribers.is_empty()
                && let Some(ns) = map.remove(&key)
            {
                ns.task.abort();
            }
        }
    }

    fn spawn_watch(&self, key: Key) -> tokio::task::JoinHandle<()> {
        let mut stream = self.backends.for_kind(key.0).watch_namespace(&key.1);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let mut map = inner.lock().unwrap_or_else(|p| p.into_inner());
                let Some(ns) = map.get_mut(&key) else { return };
                match event {
                    WatchEvent::Synced(objects) => {
                        let mut present: HashMap<String, _> = objects.into_iter().collect();
                        for (name, tx) in &ns.subscribers {
                            let state = match present.remove(name) {
                                Some(o) => LockState::Present(o),
                                None => LockState::Missing,
                            };
                            tx.send_replace(state);
                        }
                    }
                    WatchEvent::Applied(name, obj) => {
                        if let Some(tx) = ns.subscribers.get(&name) {
                            tx.send_replace(LockState::Present(obj));
                        }
                    }
                    WatchEvent::Deleted(name) => {
                        if let Some(tx) = ns.subscribers.get(&name) {
                            tx.send_replace(LockState::Missing);
                        }
                    }
                }
            }
        })
    }
}
