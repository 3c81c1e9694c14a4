//! An in-process lock store with the same semantics as the Kubernetes backends: one growing
//! version counter, conditional replace, create that fails if present, and watches. Used by
//! `electord --standalone` and by fast tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use super::{LockBackend, LockObject, RawObject, WatchEvent};
use crate::election::record::LeaderRecord;
use crate::election::{LockFailure, LockState, Observed};

#[derive(Debug, Default)]
struct Inner {
    version: u64,
    objects: HashMap<(String, String), (LeaderRecord, u64)>,
}

/// The memory backend for one lock kind (each kind has its own, as each has its own objects
/// in a cluster).
#[derive(Debug)]
pub struct MemoryLock {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<(String, WatchEvent)>,
}

fn object(record: &LeaderRecord, version: u64) -> LockObject {
    Observed {
        record: Some(record.clone()),
        version: version.to_string(),
        raw: RawObject::Memory,
    }
}

impl Default for MemoryLock {
    fn default() -> Self {
        MemoryLock {
            inner: Arc::new(Mutex::new(Inner::default())),
            changes: broadcast::channel(4096).0,
        }
    }
}

impl MemoryLock {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock_inner(&self.inner)
    }

    fn put(
        &self,
        namespace: &str,
        name: &str,
        record: &LeaderRecord,
        expect: Option<&str>,
    ) -> Result<LockObject, LockFailure> {
        let mut inner = self.lock();
        let key = (namespace.to_string(), name.to_string());
        match (inner.objects.get(&key), expect) {
            (Some(_), None) => return Err(LockFailure::Conflict),
            (None, Some(_)) => return Err(LockFailure::NotFound),
            (Some((_, v)), Some(e)) if v.to_string() != e => return Err(LockFailure::Conflict),
            _ => {}
        }
        inner.version += 1;
        let version = inner.version;
        inner.objects.insert(key, (record.clone(), version));
        let obj = object(record, version);
        let _ = self.changes.send((
            namespace.to_string(),
            WatchEvent::Applied(name.to_string(), obj.clone()),
        ));
        Ok(obj)
    }

    /// Deletes a lock object (for tests: what `kubectl delete` would do).
    pub fn delete(&self, namespace: &str, name: &str) {
        let removed = self
            .lock()
            .objects
            .remove(&(namespace.to_string(), name.to_string()));
        if removed.is_some() {
            let _ = self
                .changes
                .send((namespace.to_string(), WatchEvent::Deleted(name.to_string())));
        }
    }
}

fn lock_inner(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // Each critical section is a single map operation: a poisoned lock holds consistent data.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn snapshot(inner: &Mutex<Inner>, namespace: &str) -> Vec<(String, LockObject)> {
    lock_inner(inner)
        .objects
        .iter()
        .filter(|((ns, _), _)| ns == namespace)
        .map(|((_, name), (rec, v))| (name.clone(), object(rec, *v)))
        .collect()
}

impl LockBackend for MemoryLock {
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<LockState<RawObject>, LockFailure>> {
        let state = match self
            .lock()
            .objects
            .get(&(namespace.to_string(), name.to_string()))
        {
            Some((rec, v)) => LockState::Present(object(rec, *v)),
            None => LockState::Missing,
        };
        Box::pin(async move { Ok(state) })
    }

    fn create(
        &self,
        namespace: &str,
        name: &str,
        record: &LeaderRecord,
    ) -> BoxFuture<'static, Result<LockObject, LockFailure>> {
        let r = self.put(namespace, name, record, None);
        Box::pin(async move { r })
    }

    fn replace(
        &self,
        namespace: &str,
        name: &str,
        base: &LockObject,
        record: &LeaderRecord,
    ) -> BoxFuture<'static, Result<LockObject, LockFailure>> {
        let r = self.put(namespace, name, record, Some(&base.version));
        Box::pin(async move { r })
    }

    fn watch_namespace(&self, namespace: &str) -> BoxStream<'static, WatchEvent> {
        let rx = self.changes.subscribe();
        let initial = WatchEvent::Synced(snapshot(&self.inner, namespace));
        let ns = namespace.to_string();
        let inner = self.inner.clone();
        // A watcher that lags behind the broadcast gets a fresh snapshot instead: nothing is
        // lost, only intermediate states are skipped.
        let live = futures::stream::unfold(rx, move |mut rx| {
            let ns = ns.clone();
            let inner = inner.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok((event_ns, ev)) if event_ns == ns => return Some((ev, rx)),
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            return Some((WatchEvent::Synced(snapshot(&inner, &ns)), rx));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        futures::stream::once(async move { initial }).chain(live).boxed()
    }

    fn watch_object(&self, namespace: &str, name: &str) -> BoxStream<'static, WatchEvent> {
        let name = name.to_string();
        self.watch_namespace(namespace)
            .filter_map(move |ev| {
                let out = match ev {
                    WatchEvent::Synced(objects) => Some(WatchEvent::Synced(
                        objects.into_iter().filter(|(n, _)| *n == name).collect(),
                    )),
                    WatchEvent::Applied(n, o) => (n == name).then_some(WatchEvent::Applied(n, o)),
                    WatchEvent::Deleted(n) => (n == name).then_some(WatchEvent::Deleted(n)),
                };
                futures::future::ready(out)
            })
            .boxed()
    }
}
