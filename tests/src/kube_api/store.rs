//! The object store behind the test API server: what etcd plus the watch cache are to a real
//! kube-apiserver.
//!
//! Guarantees, as the real server gives them:
//! - one global `resourceVersion` counter; every write takes the next number, so versions are
//!   decimal strings that only grow, across all resources;
//! - every write is atomic (one mutex), so of N replaces carrying the same `resourceVersion`
//!   exactly one wins and the rest get `Conflict`;
//! - a bounded history of changes, from which watches replay everything strictly after the
//!   `resourceVersion` they ask for; a version older than the history gets `410 Expired`.

use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::watch;

use super::resources::Resource;

/// The kind of change a watch event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the history.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub resource: &'static Resource,
    pub kind: ChangeType,
    /// The object after the change (for deletes: as it was deleted, with the delete's version).
    pub object: Value,
    /// The object before the change, so a watch with a selector can tell that an object stopped
    /// matching.
    pub previous: Option<Value>,
}

/// Identifies a stored object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub resource: &'static str,
    pub namespace: String,
    pub name: String,
}

/// Why a write failed (the handler turns these into `Status` bodies).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreError {
    NotFound,
    AlreadyExists,
    Conflict,
    /// Refused by a check made inside the write (validation, admission): the `Status` to answer.
    Rejected(Value),
}

#[derive(Debug)]
struct Inner {
    rv: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Change>,
    /// Every change with a version at or below this has been dropped from the history.
    compacted_through: u64,
    history_limit: usize,
}

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    /// Carries the latest resourceVersion; watches wait on it for new changes.
    latest: watch::Sender<u64>,
}

/// What a watch gets when it asks for changes after a version.
#[derive(Debug)]
pub enum Replay {
    /// The changes, and the version the history was read through.
    Changes(Vec<Change>, u64),
    /// The version is older than the history kept.
    Expired,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Store {
    /// A store that keeps the last `history_limit` changes for watches to replay.
    pub fn new(history_limit: usize) -> Self {
        // Start at a version like a fresh cluster would be at, so that "0" and small numbers are
        // never confused with real versions.
        let start = 100;
        Store {
            inner: Mutex::new(Inner {
                rv: start,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted_through: start,
                history_limit: history_limit.max(1),
            }),
            latest: watch::channel(start).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-written (every mutation is a
        // single insert/remove), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// A receiver that changes whenever anything is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    /// Every object of a resource, optionally in one namespace, and the list's version.
    pub fn list(&self, resource: &Resource, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        // Keys sort by resource, then namespace: read only the range of this resource (and
        // namespace), so a write that looks up a few policies does not scan every Lease.
        let start = ObjectKey {
            resource: resource.plural,
            namespace: namespace.unwrap_or_default().to_string(),
            name: String::new(),
        };
        let items = inner
            .objects
            .range(start..)
            .take_while(|(k, _)| {
                k.resource == resource.plural && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// Creates an object. Server-set fields (uid, creationTimestamp, resourceVersion) are filled
    /// in; the object is returned as stored.
    pub fn create(
        &self,
        resource: &'static Resource,
        key: ObjectKey,
        mut object: Value,
    ) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        if inner.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists);
        }
        let rv = inner.rv + 1;
        {
            let meta = metadata_mut(&mut object);
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.remove("managedFields");
            meta.remove("deletionTimestamp");
        }
        self.commit(
            &mut inner,
            rv,
            resource,
            key,
            ChangeType::Added,
            Some(object.clone()),
            None,
        );
        Ok(object)
    }

    /// Replaces an object. `expected_rv` of `None` means unconditional. The uid and
    /// creationTimestamp of the stored object are kept.
    pub fn replace(
        &self,
        resource: &'static Resource,
        key: ObjectKey,
        expected_rv: Option<&str>,
        mut object: Value,
    ) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let Some(old) = inner.objects.get(&key).cloned() else {
            return Err(StoreError::NotFound);
        };
        let old_rv = old["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(expected) = expected_rv
            && expected != old_rv
        {
            return Err(StoreError::Conflict);
        }
        let rv = inner.rv + 1;
        {
            let meta = metadata_mut(&mut object);
            for field in ["uid", "creationTimestamp"] {
                if let Some(v) = old["metadata"].get(field) {
                    meta.insert(field.into(), v.clone());
                }
            }
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.remove("managedFields");
        }
        self.commit(
            &mut inner,
            rv,
            resource,
            key,
            ChangeType::Modified,
            Some(object.clone()),
            Some(old),
        );
        Ok(object)
    }

    /// Applies `f` to the stored object and stores the result, atomically (for patches). `f`
    /// may fail with a precondition conflict of its own.
    pub fn update_with<F>(
        &self,
        resource: &'static Resource,
        key: ObjectKey,
        f: F,
    ) -> Result<Value, StoreError>
    where
        F: FnOnce(&Value) -> Result<Value, StoreError>,
    {
        let mut inner = self.lock();
        let Some(old) = inner.objects.get(&key).cloned() else {
            return Err(StoreError::NotFound);
        };
        let mut object = f(&old)?;
        let rv = inner.rv + 1;
        {
            let meta = metadata_mut(&mut object);
            for field in ["uid", "creationTimestamp", "name", "namespace"] {
                if let Some(v) = old["metadata"].get(field) {
                    meta.insert(field.into(), v.clone());
                }
            }
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        self.commit(
            &mut inner,
            rv,
            resource,
            key,
            ChangeType::Modified,
            Some(object.clone()),
            Some(old),
        );
        Ok(object)
    }

    /// Deletes an object; returns it as deleted (carrying the delete's version, like watch
    /// `DELETED` events do).
    pub fn delete(&self, resource: &'static Resource, key: ObjectKey) -> Result<Value, StoreError> {
        let mut inner = self.lock();
        let Some(mut old) = inner.objects.remove(&key) else {
            return Err(StoreError::NotFound);
        };
        let rv = inner.rv + 1;
        let previous = old.clone();
        metadata_mut(&mut old).insert("resourceVersion".into(), json!(rv.to_string()));
        inner.rv = rv;
        push_history(
            &mut inner,
            Change {
                rv,
                resource,
                kind: ChangeType::Deleted,
                object: old.clone(),
                previous: Some(previous),
            },
        );
        drop(inner);
        self.latest.send_replace(rv);
        Ok(old)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        inner: &mut Inner,
        rv: u64,
        resource: &'static Resource,
        key: ObjectKey,
        kind: ChangeType,
        object: Option<Value>,
        previous: Option<Value>,
    ) {
        let object = object.unwrap_or(Value::Null);
        inner.rv = rv;
        inner.objects.insert(key, object.clone());
        push_history(
            inner,
            Change {
                rv,
                resource,
                kind,
                object,
                previous,
            },
        );
        self.latest.send_replace(rv);
    }

    /// Every change strictly after `after`, of one resource, or `Expired` when the history no
    /// longer reaches back that far.
    pub fn changes_after(&self, resource: &Resource, after: u64) -> Replay {
        let inner = self.lock();
        if after < inner.compacted_through {
            return Replay::Expired;
        }
        Replay::Changes(
            inner
                .history
                .iter()
                .filter(|c| c.rv > after && c.resource.plural == resource.plural)
                .cloned()
                .collect(),
            inner.rv,
        )
    }

    /// Drops the whole history (as an etcd compaction plus a watch-cache restart would), so any
    /// watch from a version before now gets `410 Expired`.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.compacted_through = inner.rv;
    }
}

fn push_history(inner: &mut Inner, change: Change) {
    inner.history.push_back(change);
    while inner.history.len() > inner.history_limit {
        if let Some(dropped) = inner.history.pop_front() {
            inner.compacted_through = dropped.rv;
        }
    }
}

/// The `metadata` map of an object, created if missing.
pub fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = json!({});
    }
    let obj = object.as_object_mut().expect("just made an object");
    let meta = obj.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("just made an object")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::resources::ENDPOINTS;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            resource: "endpoints",
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn versions_grow_and_history_expires() {
        let store = Store::new(2);
        let start = store.current_rv();
        let a = store
            .create(&ENDPOINTS, key("a"), json!({"metadata":{"name":"a"}}))
            .unwrap();
        let rv_a: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(rv_a, start + 1);
        store
            .create(&ENDPOINTS, key("b"), json!({"metadata":{"name":"b"}}))
            .unwrap();
        store
            .create(&ENDPOINTS, key("c"), json!({"metadata":{"name":"c"}}))
            .unwrap();
        assert!(matches!(store.changes_after(&ENDPOINTS, start), Replay::Expired));
        match store.changes_after(&ENDPOINTS, start + 1) {
            Replay::Changes(c, _) => assert_eq!(c.len(), 2),
            Replay::Expired => panic!("still in history"),
        }
    }

    #[test]
    fn stale_replace_conflicts() {
        let store = Store::new(10);
        let a = store
            .create(&ENDPOINTS, key("a"), json!({"metadata":{"name":"a"}}))
            .unwrap();
        let rv = a["metadata"]["resourceVersion"].as_str().unwrap().to_string();
        store.replace(&ENDPOINTS, key("a"), Some(&rv), a.clone()).unwrap();
        assert_eq!(
            store.replace(&ENDPOINTS, key("a"), Some(&rv), a.clone()),
            Err(StoreError::Conflict)
        );
        assert!(store.replace(&ENDPOINTS, key("a"), None, a).is_ok());
    }
}
