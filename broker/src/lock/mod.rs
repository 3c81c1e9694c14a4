//! Lock backends: where an election's [`LeaderRecord`] lives and how it is compare-and-swapped.
//!
//! - [`kube::KubeLock`] over core/v1 Endpoints (the `control-plane.alpha.kubernetes.io/leader`
//!   annotation of the 2016 sidecar and client-go) or coordination.k8s.io/v1 Lease;
//! - [`memory::MemoryLock`], the same semantics in-process (standalone mode, fast tests).
//!
//! Every backend offers the same three operations plus watches: `get`, `create`, `replace`
//! (conditional on the version last seen), `watch_namespace` and `watch_object` (one object by
//! name). The election logic
//! sees only [`LockObject`]s and [`LockFailure`]s.
//!
//! A Kubernetes backend writes only an object's lock fields, names its node in every write, and
//! refuses to write what is not a lock (see [`kube`]).

pub mod hub;
pub mod kube;
pub mod memory;

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::election::record::LeaderRecord;
use crate::election::{LockFailure, LockState, Observed};
use elector_client::protocol::LockKind;

/// The whole lock object as a backend last read it, kept so a replace preserves every other
/// field, label and annotation.
#[derive(Debug, Clone, PartialEq)]
pub enum RawObject {
    Endpoints(Arc<k8s_openapi::api::core::v1::Endpoints>),
    Lease(Arc<k8s_openapi::api::coordination::v1::Lease>),
    Memory,
}

/// A lock object as seen by the election logic.
pub type LockObject = Observed<RawObject>;

/// One change seen by a namespace watch.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// The complete set of lock objects in the namespace (after a (re)list): any name not in
    /// it does not exist.
    Synced(Vec<(String, LockObject)>),
    Applied(String, LockObject),
    Deleted(String),
}

/// Where lock records live.
pub trait LockBackend: Send + Sync + std::fmt::Debug + 'static {
    /// Reads one lock object.
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> BoxFuture<'static, Result<LockState<RawObject>, LockFailure>>;

    /// Creates the lock object with `record` (`Conflict` if it exists).
    fn create(
        &self,
        namespace: &str,
        name: &str,
        record: &LeaderRecord,
    ) -> BoxFuture<'static, Result<LockObject, LockFailure>>;

    /// Replaces `base` with a copy carrying `record`, if `base.version` is still current.
    fn replace(
        &self,
        namespace: &str,
        name: &str,
        base: &LockObject,
        record: &LeaderRecord,
    ) -> BoxFuture<'static, Result<LockObject, LockFailure>>;

    /// Every change to lock objects of this kind in a namespace, forever (re-established on
    /// errors, with back-off). Starts with a `Synced`.
    fn watch_namespace(&self, namespace: &str) -> BoxStream<'static, WatchEvent>;

    /// The same for the one object `name` (a `metadata.name=` field selector): its `Synced`
    /// holds that object or nothing, and no other object's changes are delivered.
    fn watch_object(&self, namespace: &str, name: &str) -> BoxStream<'static, WatchEvent>;
}

/// A backend for each lock kind.
#[derive(Debug, Clone)]
pub struct Backends {
    pub endpoints: Arc<dyn LockBackend>,
    pub lease: Arc<dyn LockBackend>,
    /// Where the locks live, for people: the API server's URL, or "memory".
    pub location: Arc<str>,
    /// Kubernetes Events on leadership changes (`None`: standalone, or `--events=false`).
    pub events: Option<crate::events::LeadershipEvents>,
}

impl Backends {
    pub fn for_kind(&self, kind: LockKind) -> &Arc<dyn LockBackend> {
        match kind {
            LockKind::Endpoints => &self.endpoints,
            LockKind::Lease => &self.lease,
        }
    }

    /// Both kinds in one in-process store (standalone mode).
    pub fn memory() -> Self {
        Backends {
            endpoints: Arc::new(memory::MemoryLock::default()),
            lease: Arc::new(memory::MemoryLock::default()),
            location: "memory".into(),
            events: None,
        }
    }

    /// Both kinds on a Kubernetes API server, for the broker on `node` (named in every write's
    /// `elector.dev/node` annotation), recording Kubernetes Events on leadership changes (see
    /// [`Backends::without_events`]).
    pub fn kubernetes(
        client: ::kube::Client,
        node: &str,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        let events = crate::events::LeadershipEvents::start(client.clone(), node, metrics.clone())
            .map_err(|e| tracing::warn!("no Kubernetes Events: {e}"))
            .ok();
        Backends {
            events,
            endpoints: Arc::new(kube::KubeLock::<k8s_openapi::api::core::v1::Endpoints>::new(
                client.clone(),
                node,
                metrics.clone(),
            )),
            lease: Arc::new(kube::KubeLock::<k8s_openapi::api::coordination::v1::Lease>::new(
                client, node, metrics,
            )),
            location: "the Kubernetes API".into(),
        }
    }

    /// No Kubernetes Events (`electord --events=false`).
    pub fn without_events(mut self) -> Self {
        self.events = None;
        self
    }

    /// Names where the locks live (the API server's URL) in logs and `unknown` views.
    pub fn at(mut self, location: impl Into<Arc<str>>) -> Self {
        self.location = location.into();
        self
    }
}
