//! Lock objects on a Kubernetes API server: Endpoints (leader annotation) and Lease.
//!
//! Both go through one `kube::Client`. Replaces carry the `resourceVersion` last seen, so the API
//! server does the compare-and-swap. Watches are per namespace and lock kind, not per election:
//! each kube-rs watch over HTTP/1.1 holds its own connection, so a broker with thousands of
//! elections in a few namespaces keeps a few connections instead of thousands (see
//! `docs/architecture.md`).
//!
//! What a write changes, and nothing else (everything else read is written back as read):
//! - the leader record: the `control-plane.alpha.kubernetes.io/leader` annotation of an
//!   Endpoints, the holder fields of a Lease's spec (`strategy` and `preferredHolder` are kept);
//! - the `elector.dev/node` annotation, naming this broker's node on every write (the admission
//!   policy in deploy/ checks it against the node in the broker's bound token);
//! - on objects the broker creates, the label `app.kubernetes.io/managed-by: elector` (objects
//!   created by others, client-go's included, are not relabelled).
//!
//! Failure modes beyond conflicts: an Endpoints object with subsets is a live Service's, not a
//! lock; the broker refuses to write it ([`LockFailure::NotALock`], nothing is sent). A 403 from
//! the API server (RBAC: the namespace has not opted in; or the admission policy) becomes
//! [`LockFailure::Forbidden`] carrying the server's message, which names the missing permission.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LockBackend, LockObject, RawObject, WatchEvent};
use crate::election::record::{
    HOLDER_POD_ANNOTATION, LEADER_ANNOTATION, LeaderRecord, MANAGED_BY, MANAGED_BY_LABEL, NODE_ANNOTATION,
};
use crate::election::{LockFailure, LockState, Observed};
use crate::metrics::Metrics;
use elector_client::protocol::LockKind;

/// A Kubernetes object type that can hold a leader record.
pub trait LockResource:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    const KIND: LockKind;
    /// The API resource name, for metrics and logs.
    const PLURAL: &'static str;
    fn record(&self) -> Option<LeaderRecord>;
    /// `base` (or a new object) carrying `record`, written by the broker on `node`; everything
    /// else in `base` is kept (see [`stamp`]).
    fn with_record(base: Option<&Self>, name: &str, record: &LeaderRecord, node: &str) -> Self;
    /// Why this object is not a lock the broker may write, if it is not.
    fn not_a_lock(&self) -> Option<String> {
        None
    }
    fn wrap(self) -> RawObject;
    fn unwrap(raw: &RawObject) -> Option<&Self>;
}

impl LockResource for Endpoints {
    const KIND: LockKind = LockKind::Endpoints;
    const PLURAL: &'static str = "endpoints";

    fn record(&self) -> Option<LeaderRecord> {
        let mut record = self
            .metadata
            .annotations
            .as_ref()?
            .get(LEADER_ANNOTATION)
            .and_then(|v| LeaderRecord::from_annotation(v))?;
        record.holder_pod = holder_pod(&self.metadata);
        Some(record)
    }

    fn with_record(base: Option<&Self>, name: &str, record: &LeaderRecord, node: &str) -> Self {
        let mut ep = base.cloned().unwrap_or_else(|| Endpoints {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        });
        // Always present: the endpoints controller leaves Endpoints carrying it alone.
        ep.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(LEADER_ANNOTATION.to_string(), record.to_annotation());
        stamp(&mut ep.metadata, node, record, base.is_none());
        ep
    }

    fn not_a_lock(&self) -> Option<String> {
        let subsets = self.subsets.as_ref().map_or(0, Vec::len);
        (subsets > 0).then(|| {
            format!(
                "endpoints {:?} in namespace {:?} has {subsets} subset(s): it is a live Service's, not a lock; elector never writes it (choose another election name, or a Lease lock)",
                self.metadata.name.as_deref().unwrap_or_default(),
                self.metadata.namespace.as_deref().unwrap_or_default(),
            )
        })
    }

    fn wrap(self) -> RawObject {
        RawObject::Endpoints(Arc::new(self))
    }

    fn unwrap(raw: &RawObject) -> Option<&Self> {
        match raw {
            RawObject::Endpoints(e) => Some(e),
            _ => None,
        }
    }
}

/// The metadata every write sets: the writing node, the holder's pod when the broker attested it
/// (removed otherwise, so that it never outlives the holder it names), and on objects the broker
/// creates, elector's managed-by label. `managedFields` are the server's and are not sent back.
fn stamp(meta: &mut ObjectMeta, node: &str, record: &LeaderRecord, created: bool) {
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(NODE_ANNOTATION.to_string(), node.to_string());
    match &record.holder_pod {
        Some(uid) => annotations.insert(HOLDER_POD_ANNOTATION.to_string(), uid.clone()),
        None => annotations.remove(HOLDER_POD_ANNOTATION),
    };
    if created {
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
    }
    meta.managed_fields = None;
}

fn holder_pod(meta: &ObjectMeta) -> Option<String> {
    meta.annotations.as_ref()?.get(HOLDER_POD_ANNOTATION).cloned()
}

fn to_micro(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<MicroTime> {
    let t = t?;
    k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros())
        .ok()
        .map(MicroTime)
}

fn from_micro(t: &Option<MicroTime>) -> Option<chrono::DateTime<chrono::Utc>> {
    t.as_ref()
        .and_then(|m| chrono::DateTime::from_timestamp_micros(m.0.as_microsecond()))
}

impl LockResource for Lease {
    const KIND: LockKind = LockKind::Lease;
    const PLURAL: &'static str = "leases";

    fn record(&self) -> Option<LeaderRecord> {
        let spec = self.spec.as_ref()?;
        Some(LeaderRecord {
            holder_identity: spec.holder_identity.clone().unwrap_or_default(),
            lease_duration_seconds: spec.lease_duration_seconds.unwrap_or(0).max(0) as u32,
            acquire_time: from_micro(&spec.acquire_time),
            renew_time: from_micro(&spec.renew_time),
            leader_transitions: spec.lease_transitions.unwrap_or(0).max(0) as u64,
            holder_pod: holder_pod(&self.metadata),
        })
    }

    fn with_record(base: Option<&Self>, name: &str, record: &LeaderRecord, node: &str) -> Self {
        let mut lease = base.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: None,
        });
        // `strategy` and `preferredHolder` (coordinated leader election) are kept as found.
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(record.holder_identity.clone());
        spec.lease_duration_seconds = Some(record.lease_duration_seconds.min(i32::MAX as u32) as i32);
        spec.acquire_time = to_micro(record.acquire_time);
        spec.renew_time = to_micro(record.renew_time);
        spec.lease_transitions = Some(record.leader_transitions.min(i32::MAX as u64) as i32);
        stamp(&mut lease.metadata, node, record, base.is_none());
        lease
    }

    fn wrap(self) -> RawObject {
        RawObject::Lease(Arc::new(self))
    }

    fn unwrap(raw: &RawObject) -> Option<&Self> {
        match raw {
            RawObject::Lease(l) => Some(l),
            _ => None,
        }
    }
}

fn observed<K: LockResource>(obj: K) -> LockObject {
    Observed {
        record: obj.record(),
        version: obj.meta().resource_version.clone().unwrap_or_default(),
        raw: obj.wrap(),
    }
}

/// Maps a kube error onto what the election logic needs to know.
pub fn classify(err: &kube::Error) -> LockFailure {
    match err {
        kube::Error::Api(status) => match status.code {
            409 => LockFailure::Conflict,
            404 => LockFailure::NotFound,
            403 => LockFailure::Forbidden {
                message: status.message.clone(),
            },
            _ => LockFailure::Transient {
                cause: format!("{} {}: {}", status.code, status.reason, status.message),
                retry_after: status
                    .details
                    .as_ref()
                    .map(|d| d.retry_after_seconds)
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(u64::from(s))),
            },
        },
        other => LockFailure::transient(error_chain(other)),
    }
}

/// An error with its sources ("client error (Connect): tcp connect error: Connection refused"):
/// kube's own message alone often hides the cause.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn status_label(r: &Result<impl Sized, kube::Error>) -> String {
    match r {
        Ok(_) => "2xx".into(),
        Err(kube::Error::Api(s)) => s.code.to_string(),
        Err(_) => "transport".into(),
    }
}

/// The Kubernetes backend for one lock kind.
pub struct KubeLock<K> {
    client: kube::Client,
    /// The node this broker runs on, named in every write.
    node: Arc<str>,
    metrics: Option<Arc<Metrics>>,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Debug for KubeLock<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLock")
            .field("kind", &std::any::type_name::<K>())
            .field("node", &self.node)
            .finish()
    }
}

impl<K: LockResource> KubeLock<K> {
    /// The backend of a broker on `node`.
    pub fn new(client: kube::Client, node: &str, metrics: Option<Arc<Metrics>>) -> Self {
        KubeLock {
            client,
            node: node.into(),
            metrics,
            _kind: PhantomData,
        }
    }

    fn api(&self, namespace: &str) -> Api<K> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

fn record_call<T>(
    metrics: &Option<Arc<Metrics>>,
    verb: &str,
    resource: &str,
    started: Instant,
    r: &Result<T, kube::Error>,
) {
    if let Some(m) = metrics {
        m.api_request(verb, resource, &status_label(r), started.elapsed());
    }
    if let Err(e) = r {
        tracing::debug!(verb, resource, error = %e, "API request failed");
    }
}

impl<K: LockResource> LockBackend for KubeLock<K> {
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<LockState<RawObject>, LockFailure>> {
        let api = self.api(namespace);
        let name = name.to_string();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = Instant::now();
            let r = api.get_opt(&name).await;
            record_call(&metrics, "get", K::PLURAL, started, &r);
            match r {
                Ok(Some(obj)) => Ok(LockState::Present(observed(obj))),
                Ok(None) => Ok(LockState::Missing),
                Err(e) => Err(classify(&e)),
            }
        })
    }

    fn create(
        &self,
        namespace: &str,
        name: &str,
        record: &LeaderRecord,
    ) -> BoxFuture<'static, Result<LockObject, LockFailure>> {
        let api = self.api(namespace);
        let obj = K::with_record(None, name, record, &self.node);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = Instant::now();
            let r = api.create(&PostParams::default(), &obj).await;
            record_call(&metrics, "create", K::PLURAL, started, &r);
            r.map(observed).map_err(|e| classify(&e))
        })
    }

    fn replace(
        &self,
        namespace: &str,
        name: &str,
        base: &LockObject,
        record: &LeaderRecord,
    ) -> BoxFuture<'static, Result<LockObject, LockFailure>> {
        let current = K::unwrap(&base.raw);
        // A replace conditional on `base.version` can only succeed on exactly this object, so a
        // refusal here is airtight: nothing else is sent.
        if let Some(message) = current.and_then(LockResource::not_a_lock) {
            tracing::warn!(namespace, name, "{message}");
            return Box::pin(futures::future::ready(Err(LockFailure::NotALock { message })));
        }
        let api = self.api(namespace);
        let mut obj = K::with_record(current, name, record, &self.node);
        // The compare-and-swap token: the version this decision was based on.
        obj.meta_mut().resource_version = Some(base.version.clone());
        let name = name.to_string();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = Instant::now();
            let r = api.replace(&name, &PostParams::default(), &obj).await;
            record_call(&metrics, "update", K::PLURAL, started, &r);
            r.map(observed).map_err(|e| classify(&e))
        })
    }

    fn watch_namespace(&self, namespace: &str) -> BoxStream<'static, WatchEvent> {
        self.watch_with(namespace, watcher::Config::default())
    }

    fn watch_object(&self, namespace: &str, name: &str) -> BoxStream<'static, WatchEvent> {
        self.watch_with(
            namespace,
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
    }
}

impl<K: LockResource> KubeLock<K> {
    /// A watch of this kind's objects in `namespace` that `config` selects, as [`WatchEvent`]s.
    fn watch_with(&self, namespace: &str, config: watcher::Config) -> BoxStream<'static, WatchEvent> {
        let api = self.api(namespace);
        let metrics = self.metrics.clone();
        let ns = namespace.to_string();
        let mut buffer: Vec<(String, LockObject)> = Vec::new();
        watcher(api, config)
            .default_backoff()
            .filter_map(move |ev| {
                let out = match ev {
                    Ok(watcher::Event::Init) => {
                        buffer.clear();
                        None
                    }
                    Ok(watcher::Event::InitApply(o)) => {
                        let name = o.meta().name.clone().unwrap_or_default();
                        buffer.push((name, observed(o)));
                        None
                    }
                    Ok(watcher::Event::InitDone) => Some(WatchEvent::Synced(std::mem::take(&mut buffer))),
                    Ok(watcher::Event::Apply(o)) => {
                        let name = o.meta().name.clone().unwrap_or_default();
                        Some(WatchEvent::Applied(name, observed(o)))
                    }
                    Ok(watcher::Event::Delete(o)) => Some(WatchEvent::Deleted(o.meta().name.clone().unwrap_or_default())),
                    Err(e) => {
                        tracing::warn!(namespace = %ns, kind = K::PLURAL, error = %error_chain(&e), "watch failed; re-establishing");
                        if let Some(m) = &metrics {
                            m.watch_restarts.inc();
                        }
                        None
                    }
                };
                futures::future::ready(out)
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_other_annotations_and_fields() {
        let mut base = Endpoints::default();
        base.metadata.name = Some("e".into());
        base.metadata.annotations = Some([("keep".to_string(), "me".to_string())].into());
        base.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        let rec = LeaderRecord {
            holder_identity: "a".into(),
            lease_duration_seconds: 15,
            acquire_time: None,
            renew_time: None,
            leader_transitions: 2,
            ..Default::default()
        };
        let ep = Endpoints::with_record(Some(&base), "e", &rec, "n1");
        let ann = ep.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann["keep"], "me");
        assert_eq!(ann[NODE_ANNOTATION], "n1");
        assert_eq!(ann.len(), 3, "only the record and the node are added: {ann:?}");
        assert_eq!(ep.record().unwrap(), rec);
        assert_eq!(
            ep.metadata.labels, base.metadata.labels,
            "an object elector did not create is not relabelled"
        );
        assert_eq!(ep.subsets, None);
        assert!(ep.not_a_lock().is_none());

        let created = Endpoints::with_record(None, "e", &rec, "n2");
        assert_eq!(created.metadata.labels.unwrap()[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(created.metadata.annotations.unwrap()[NODE_ANNOTATION], "n2");
    }

    #[test]
    fn the_holder_pod_is_written_for_an_attested_holder_and_removed_for_any_other() {
        let attested = LeaderRecord {
            holder_identity: "web-0".into(),
            lease_duration_seconds: 15,
            leader_transitions: 4,
            holder_pod: Some("uid-1".into()),
            ..Default::default()
        };
        let lease = Lease::with_record(None, "l", &attested, "n1");
        assert_eq!(
            lease.metadata.annotations.as_ref().unwrap()[HOLDER_POD_ANNOTATION],
            "uid-1"
        );
        assert_eq!(lease.record().unwrap(), attested);
        let ep = Endpoints::with_record(None, "e", &attested, "n1");
        assert_eq!(ep.record().unwrap(), attested, "read back from the annotation");
        // The next holder was not attested (or the record is released): the pod goes with it.
        let plain = LeaderRecord {
            holder_pod: None,
            ..attested.clone()
        };
        for (name, ann) in [
            (
                "lease",
                Lease::with_record(Some(&lease), "l", &plain, "n1")
                    .metadata
                    .annotations,
            ),
            (
                "endpoints",
                Endpoints::with_record(Some(&ep), "e", &plain, "n1")
                    .metadata
                    .annotations,
            ),
        ] {
            assert!(!ann.unwrap().contains_key(HOLDER_POD_ANNOTATION), "{name}");
        }
        assert_eq!(
            LeaderRecord::from_annotation(&attested.to_annotation())
                .unwrap()
                .holder_pod,
            None,
            "client-go's record format carries no pod"
        );
    }

    #[test]
    fn endpoints_with_subsets_are_not_locks() {
        let mut svc: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "subsets": [{"addresses": [{"ip": "10.0.0.9"}], "ports": [{"port": 80}]}]
        }))
        .unwrap();
        let why = svc.not_a_lock().unwrap();
        assert!(why.contains("\"web\"") && why.contains("live Service"), "{why}");
        svc.subsets = Some(vec![]);
        assert!(svc.not_a_lock().is_none(), "empty subsets: a lock");
    }

    #[test]
    fn a_403_is_forbidden_with_the_servers_message() {
        let message = "leases.coordination.k8s.io is forbidden: User \"u\" cannot create resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"x\"";
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "code": 403, "message": message, "reason": "Forbidden", "status": "Failure"
        }))
        .unwrap();
        assert_eq!(
            classify(&kube::Error::Api(Box::new(status))),
            LockFailure::Forbidden {
                message: message.to_string()
            }
        );
    }

    #[test]
    fn lease_keeps_strategy_and_preferred_holder() {
        let base = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                strategy: Some("OldestEmulationVersion".into()),
                preferred_holder: Some("b".into()),
                ..Default::default()
            }),
        };
        let now = chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let rec = LeaderRecord {
            holder_identity: "a".into(),
            lease_duration_seconds: 15,
            acquire_time: Some(now),
            renew_time: Some(now),
            leader_transitions: 1,
            ..Default::default()
        };
        let l = Lease::with_record(Some(&base), "l", &rec, "n1");
        assert_eq!(l.metadata.annotations.as_ref().unwrap()[NODE_ANNOTATION], "n1");
        assert_eq!(l.metadata.labels, None, "client-go's Lease is not relabelled");
        let spec = l.spec.as_ref().unwrap();
        assert_eq!(spec.strategy.as_deref(), Some("OldestEmulationVersion"));
        assert_eq!(spec.preferred_holder.as_deref(), Some("b"));
        assert_eq!(l.record().unwrap(), rec, "microsecond times survive");
    }
}
