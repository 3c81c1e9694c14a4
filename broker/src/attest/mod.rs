//! Knowing who is calling: the pod behind a socket connection, as the SPIRE agent does for its
//! workload socket.
//!
//! At accept: `SO_PEERCRED` gives the caller's pid (the DaemonSet runs with `hostPID`); its
//! `/proc/<pid>/cgroup` names its pod UID and container ID ([`cgroup`]); a watch of this node's
//! pods maps the UID to namespace, name and service account ([`PodCache`]). The process start
//! time is read before and after the lookup, so a pid reused meanwhile is detected.
//!
//! Policy (`--attest=kubernetes`): an attested caller campaigns and observes only in its own
//! namespace (`forbidden_namespace`), and campaigns only as its pod name or `<pod>/<suffix>`
//! (`forbidden_identity`). Both default to the caller's.

pub mod cgroup;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use cgroup::CgroupError;

/// The separator between a pod name and an identity suffix: `web-0/worker-2`. `/` cannot occur
/// in a pod name, so the pod part is unambiguous.
pub const IDENTITY_SEPARATOR: char = '/';

/// What the broker knows of a pod on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// Container IDs from the pod's status (64 hex digits, runtime prefix removed).
    pub container_ids: Vec<String>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        let ids = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
                    .chain(s.ephemeral_container_statuses.iter().flatten())
            })
            .filter_map(|c| c.container_id.as_deref())
            .map(|id| id.rsplit("://").next().unwrap_or(id).to_ascii_lowercase())
            .collect();
        Some(PodInfo {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            container_ids: ids,
        })
    }
}

/// The pods of this node, by UID, kept current by a watch.
#[derive(Debug)]
pub struct PodCache {
    pods: RwLock<HashMap<String, PodInfo>>,
    changed: watch::Sender<u64>,
}

impl Default for PodCache {
    fn default() -> Self {
        PodCache {
            pods: RwLock::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl PodCache {
    pub fn insert(&self, pod: PodInfo) {
        self.pods
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.uid.clone(), pod);
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn remove(&self, uid: &str) {
        self.pods.write().unwrap_or_else(|p| p.into_inner()).remove(uid);
        self.changed.send_modify(|v| *v += 1);
    }

    fn replace_all(&self, pods: Vec<PodInfo>) {
        *self.pods.write().unwrap_or_else(|p| p.into_inner()) =
            pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find(&self, uid: Option<&str>, container: Option<&str>) -> Option<PodInfo> {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        match (uid, container) {
            (Some(uid), _) => pods.get(uid).cloned(),
            (None, Some(c)) => pods
                .values()
                .find(|p| p.container_ids.iter().any(|id| id == c))
                .cloned(),
            (None, None) => None,
        }
    }

    /// Waits up to `wait` for a pod to appear (a pod that started a moment ago may not be in
    /// the cache yet), and, if its container statuses are known, to list `container`.
    async fn lookup(
        &self,
        uid: Option<&str>,
        container: Option<&str>,
        wait: Duration,
    ) -> Result<PodInfo, AttestError> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            rx.borrow_and_update();
            let found = self.find(uid, container);
            let container_ok = |p: &PodInfo| {
                container
                    .is_none_or(|c| p.container_ids.is_empty() || p.container_ids.iter().any(|id| id == c))
            };
            match &found {
                Some(p) if container_ok(p) => return Ok(p.clone()),
                _ => {}
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(match (found, uid, container) {
                    (Some(p), _, Some(c)) => AttestError::ContainerMismatch {
                        pod: format!("{}/{}", p.namespace, p.name),
                        container: c.to_string(),
                    },
                    (_, Some(uid), _) => AttestError::UnknownPod(uid.to_string()),
                    (_, None, c) => AttestError::UnknownContainer(c.unwrap_or_default().to_string()),
                });
            }
        }
    }

    /// Keeps the cache current with a watch of the pods bound to `node`.
    pub fn watch_node(self: &Arc<Self>, client: kube::Client, node: &str) -> tokio::task::JoinHandle<()> {
        let api: kube::Api<Pod> = kube::Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let cache = self.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Init) => buffer.clear(),
                    Ok(watcher::Event::InitApply(p)) => buffer.extend(PodInfo::from_pod(&p)),
                    Ok(watcher::Event::InitDone) => cache.replace_all(std::mem::take(&mut buffer)),
                    Ok(watcher::Event::Apply(p)) => {
                        if let Some(info) = PodInfo::from_pod(&p) {
                            cache.insert(info);
                        }
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(uid) = p.metadata.uid {
                            cache.remove(&uid);
                        }
                    }
                    Err(e) => tracing::warn!("pod watch failed; re-establishing: {e}"),
                }
            }
        })
    }
}

/// How to run without attestation, and why that is unsafe: said with every attestation failure
/// (the `unattested` error a client gets, and the broker's log line) and at start-up.
pub const WITHOUT_ATTESTATION: &str = "to run without attestation (a broker on a laptop or in CI, \
     whose clients are host processes), start electord with --attest=none; that trusts whatever \
     a client says, so any process that can reach the socket may campaign in any namespace \
     under any identity: never use it on a cluster node that runs untrusted pods";

/// Why a caller could not be attested. Every message ends with [`WITHOUT_ATTESTATION`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("the kernel did not report the caller's pid ({WITHOUT_ATTESTATION})")]
    NoPeerPid,
    #[error(
        "process {0} is gone (or not visible: does the broker run with hostPID?) ({WITHOUT_ATTESTATION})"
    )]
    ProcessGone(i32),
    #[error("{0} ({WITHOUT_ATTESTATION})")]
    Cgroup(#[from] CgroupError),
    #[error("pod {0} is not (yet) known on this node ({WITHOUT_ATTESTATION})")]
    UnknownPod(String),
    #[error("no pod on this node runs container {0} ({WITHOUT_ATTESTATION})")]
    UnknownContainer(String),
    #[error("container {container} is not one of pod {pod}'s containers ({WITHOUT_ATTESTATION})")]
    ContainerMismatch { pod: String, container: String },
    #[error("process {0} exited and its pid was reused during attestation ({WITHOUT_ATTESTATION})")]
    PidReused(i32),
}

impl AttestError {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AttestError::NoPeerPid => "no_pid",
            AttestError::ProcessGone(_) => "process_gone",
            AttestError::Cgroup(CgroupError::NotAPod) => "not_a_pod",
            AttestError::Cgroup(CgroupError::AmbiguousPod(..)) => "ambiguous_pod",
            AttestError::Cgroup(CgroupError::Malformed) => "bad_cgroup",
            AttestError::UnknownPod(_) => "unknown_pod",
            AttestError::UnknownContainer(_) => "unknown_container",
            AttestError::ContainerMismatch { .. } => "container_mismatch",
            AttestError::PidReused(_) => "pid_reused",
        }
    }
}

/// An attested caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub pod: PodInfo,
    pub container_id: Option<String>,
}

/// What an attested caller may not do. The message is for the client; [`PolicyError::code`]
/// is the protocol's error code for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// An election outside the caller's own namespace.
    #[error(
        "pod {namespace}/{pod} may only take part in elections of its own namespace {namespace:?}, not {requested:?}"
    )]
    ForeignNamespace {
        namespace: String,
        pod: String,
        requested: String,
    },
    /// An identity other than the caller's pod name (or `<pod name>/<suffix>`).
    #[error("pod {pod} may campaign as {pod:?} or \"{pod}{IDENTITY_SEPARATOR}<suffix>\", not {requested:?}")]
    ForeignIdentity { pod: String, requested: String },
}

impl PolicyError {
    pub fn code(&self) -> elector_client::protocol::ErrorCode {
        match self {
            PolicyError::ForeignNamespace { .. } => elector_client::protocol::ErrorCode::ForbiddenNamespace,
            PolicyError::ForeignIdentity { .. } => elector_client::protocol::ErrorCode::ForbiddenIdentity,
        }
    }
}

impl Caller {
    /// The namespace to use: the caller's, and only the caller's.
    pub fn namespace(&self, requested: Option<&str>) -> Result<String, PolicyError> {
        match requested {
            None => Ok(self.pod.namespace.clone()),
            Some(ns) if ns == self.pod.namespace => Ok(ns.to_string()),
            Some(ns) => Err(PolicyError::ForeignNamespace {
                namespace: self.pod.namespace.clone(),
                pod: self.pod.name.clone(),
                requested: ns.to_string(),
            }),
        }
    }

    /// The identity to campaign under: the pod name, or `<pod name>/<suffix>`.
    pub fn identity(&self, requested: Option<&str>) -> Result<String, PolicyError> {
        let pod = &self.pod.name;
        match requested {
            None => Ok(pod.clone()),
            Some(id) if id == pod => Ok(id.to_string()),
            Some(id)
                if id
                    .strip_prefix(pod.as_str())
                    .and_then(|rest| rest.strip_prefix(IDENTITY_SEPARATOR))
                    .is_some_and(|suffix| !suffix.is_empty()) =>
            {
                Ok(id.to_string())
            }
            Some(id) => Err(PolicyError::ForeignIdentity {
                pod: pod.clone(),
                requested: id.to_string(),
            }),
        }
    }
}

/// Attests callers from their pid.
#[derive(Debug)]
pub struct Attestor {
    proc_root: PathBuf,
    pods: Arc<PodCache>,
    wait: Duration,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl Attestor {
    /// `proc_root` is `/proc` in production, a fabricated tree in tests.
    pub fn new(proc_root: impl Into<PathBuf>, pods: Arc<PodCache>, wait: Duration) -> Self {
        Attestor {
            proc_root: proc_root.into(),
            pods,
            wait,
        }
    }

    fn start_time(&self, pid: i32) -> Result<u64, AttestError> {
        read(&self.proc_root.join(pid.to_string()).join("stat"))
            .as_deref()
            .and_then(cgroup::start_time)
            .ok_or(AttestError::ProcessGone(pid))
    }

    /// Who the process `pid` is.
    pub async fn attest(&self, pid: Option<i32>) -> Result<Caller, AttestError> {
        let pid = pid.filter(|p| *p > 0).ok_or(AttestError::NoPeerPid)?;
        let started = self.start_time(pid)?;
        let content = read(&self.proc_root.join(pid.to_string()).join("cgroup"))
            .ok_or(AttestError::ProcessGone(pid))?;
        let ids = cgroup::parse(&content)?;
        let pod = self
            .pods
            .lookup(ids.pod_uid.as_deref(), ids.container_id.as_deref(), self.wait)
            .await?;
        // The same process still? (A pid freed and reused meanwhile has another start time.)
        match self.start_time(pid) {
            Ok(t) if t == started => {}
            Ok(_) => return Err(AttestError::PidReused(pid)),
            Err(_) => return Err(AttestError::ProcessGone(pid)),
        }
        Ok(Caller {
            pid,
            pod,
            container_id: ids.container_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attestation_failure_says_how_to_run_without_it_and_why_that_is_unsafe() {
        let errors = [
            AttestError::NoPeerPid,
            AttestError::ProcessGone(7),
            AttestError::Cgroup(CgroupError::NotAPod),
            AttestError::Cgroup(CgroupError::AmbiguousPod("a".into(), "b".into())),
            AttestError::Cgroup(CgroupError::Malformed),
            AttestError::UnknownPod("uid".into()),
            AttestError::UnknownContainer("c".into()),
            AttestError::ContainerMismatch {
                pod: "ns/p".into(),
                container: "c".into(),
            },
            AttestError::PidReused(7),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.contains("--attest=none"), "{text}");
            assert!(text.contains("any identity"), "{text}");
        }
        assert!(
            AttestError::Cgroup(CgroupError::NotAPod)
                .to_string()
                .starts_with("the process's cgroups name no pod")
        );
    }
}
