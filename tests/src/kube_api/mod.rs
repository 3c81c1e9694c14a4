//! A test Kubernetes API server: the stand-in for a real cluster in every elector test.
//!
//! It speaks the Kubernetes REST API for what elector (and `kubectl get`) uses: core/v1
//! `endpoints` and `pods`, coordination.k8s.io/v1 `leases`; get, list, watch, create, replace,
//! JSON merge patch and delete; discovery; and Events, events.k8s.io/v1 and core/v1 ([`events`]). Its answers are held to a real kube-apiserver's by
//! replaying `shared/kube-api-transcripts/` (see `tests/transcripts.rs`).
//!
//! On top it has what tests need and a real server does not give: bearer-token users with
//! allow-lists (RBAC), a request log, and per-user fault injection (latency, error bursts,
//! partitions, watch cuts, a global pause).
//!
//! It serves plain HTTP on 127.0.0.1. Why not HTTPS: the part under test is elector's use of the
//! API (requests, versions, watches, errors), not kube's TLS stack; plain HTTP keeps every test's
//! set-up free of certificates and lets the request log see every byte. kube's client treats an
//! `http://` cluster exactly like an `https://` one above the transport. client-go (so `kubectl`)
//! sends bearer tokens only over HTTPS: it comes in as `system:anonymous`, which a test can allow
//! ([`TestApiServer::add_anonymous`]; `tests/kubectl.rs`; the `test-apiserver` binary does).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use elector_tests::kube_api::{TestApiServer, Rule};
//! let server = TestApiServer::start().await?;
//! let broker = server.add_user("broker-a", vec![Rule::all()]);
//! let client = server.client(&broker).await?; // a kube::Client as that user
//! server.faults(&broker).partition(true);     // cut it off
//! # Ok(()) }
//! ```

pub mod admission;
pub mod events;
pub mod resources;
pub mod selector;
mod server;
pub mod store;
pub mod watch_stats;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

pub use store::Store;
pub use watch_stats::WatchStats;

/// One RBAC rule: the verbs allowed on resources of API groups, in some namespaces or all.
/// `"*"` matches anything in `verbs`, `api_groups` and `resources`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    /// `None`: every namespace and cluster scope.
    pub namespaces: Option<Vec<String>>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Rule {
    /// Everything (like `system:masters`).
    pub fn all() -> Self {
        Rule::new(&["*"], &["*"], &["*"])
    }

    pub fn new(verbs: &[&str], api_groups: &[&str], resources: &[&str]) -> Self {
        Rule {
            verbs: strings(verbs),
            api_groups: strings(api_groups),
            resources: strings(resources),
            namespaces: None,
        }
    }

    /// Narrows the rule to some namespaces (like a RoleBinding).
    pub fn in_namespaces(mut self, namespaces: &[&str]) -> Self {
        self.namespaces = Some(strings(namespaces));
        self
    }

    /// Whether the rule allows the request.
    pub fn allows(&self, verb: &str, group: &str, resource: &str, namespace: Option<&str>) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        has(&self.verbs, verb)
            && has(&self.api_groups, group)
            && has(&self.resources, resource)
            && match (&self.namespaces, namespace) {
                (None, _) => true,
                (Some(nss), Some(ns)) => nss.iter().any(|n| n == ns),
                (Some(_), None) => false,
            }
    }
}

/// A user of the test server, known by its bearer token.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub token: String,
    pub rules: Vec<Rule>,
    /// What the authenticator adds about the user (`userInfo.extra`): a bound service-account
    /// token carries `authentication.kubernetes.io/node-name`, `pod-name` and the like.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The `userInfo.extra` key a pod-bound service-account token fills with the pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// The error a fault injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InjectedError {
    /// 500 InternalError.
    #[default]
    Internal,
    /// 429 TooManyRequests with a `Retry-After` header of this many seconds.
    TooManyRequests { retry_after_seconds: u32 },
    /// 503 ServiceUnavailable.
    Unavailable,
}

/// The faults applied to one user's requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    /// Added before every request is answered (and before a watch starts).
    pub latency: Duration,
    /// The fraction (0.0–1.0) of requests that fail with `error`.
    pub error_rate: f64,
    pub error: InjectedError,
    /// Requests hang until healed; open watches go silent.
    pub partitioned: bool,
}

#[derive(Debug, Default)]
struct FaultState {
    per_user: HashMap<String, FaultConfig>,
    /// Bumped to end every open watch of a user.
    watch_cuts: HashMap<String, u64>,
    paused: bool,
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub user: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, or `discovery`.
    pub verb: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub path: String,
    pub status: u16,
    /// When the request arrived (monotonic) and when it was answered.
    pub at: Instant,
    pub wall: SystemTime,
    pub duration: Duration,
}

impl LogEntry {
    /// Create, update, patch or delete.
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete")
    }

    /// `verb path`, for assertion messages.
    pub fn summary(&self) -> String {
        format!("{} {}", self.verb, self.path)
    }
}

/// Options for [`TestApiServer::start_with`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How many changes the watch history keeps (older versions get 410).
    pub history_limit: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Where kubeconfig files are written (a temporary directory when `None`).
    pub dir: Option<PathBuf>,
    pub port: u16,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(10),
            dir: None,
            port: 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    store: Store,
    users: RwLock<HashMap<String, User>>,
    faults: Mutex<FaultState>,
    /// Bumped on every fault change, so waiting requests and watches re-check.
    fault_changed: watch::Sender<u64>,
    log: Mutex<Vec<LogEntry>>,
    watches: watch_stats::WatchLog,
    policies: admission::PolicyCache,
    options: ServerOptions,
    addr: SocketAddr,
}

impl Shared {
    fn fault_state(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change_faults(&self, f: impl FnOnce(&mut FaultState)) {
        f(&mut self.fault_state());
        self.fault_changed.send_modify(|g| *g += 1);
    }

    pub(crate) fn faults_of(&self, user: &str) -> FaultConfig {
        self.fault_state().per_user.get(user).cloned().unwrap_or_default()
    }

    /// Whether a user's traffic is held (partitioned, or the whole server paused).
    pub(crate) fn is_held(&self, user: &str) -> bool {
        let s = self.fault_state();
        s.paused || s.per_user.get(user).is_some_and(|f| f.partitioned)
    }

    pub(crate) fn watch_cut_generation(&self, user: &str) -> u64 {
        self.fault_state().watch_cuts.get(user).copied().unwrap_or(0)
    }
}

/// A running test API server. Dropping it stops the server.
#[derive(Debug)]
pub struct TestApiServer {
    shared: Arc<Shared>,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    task: tokio::task::JoinHandle<()>,
    admin: User,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Controls one user's faults; see [`TestApiServer::faults`].
#[derive(Debug)]
pub struct Faults<'a> {
    shared: &'a Shared,
    user: String,
}

impl Faults<'_> {
    fn set(&self, f: impl FnOnce(&mut FaultConfig)) {
        let user = self.user.clone();
        self.shared
            .change_faults(|s| f(s.per_user.entry(user).or_default()));
    }

    /// Every request of the user waits this long first.
    pub fn latency(&self, d: Duration) {
        self.set(|f| f.latency = d);
    }

    /// A fraction of the user's requests fail with `error`.
    pub fn errors(&self, rate: f64, error: InjectedError) {
        self.set(|f| {
            f.error_rate = rate.clamp(0.0, 1.0);
            f.error = error;
        });
    }

    /// Partition (`true`) or heal (`false`): while partitioned, requests hang and open watches
    /// send nothing; after healing they go on.
    pub fn partition(&self, on: bool) {
        self.set(|f| f.partitioned = on);
    }

    /// Ends every open watch of the user now.
    pub fn cut_watches(&self) {
        let user = self.user.clone();
        self.shared
            .change_faults(|s| *s.watch_cuts.entry(user).or_default() += 1);
    }

    /// Removes every fault of the user.
    pub fn clear(&self) {
        self.set(|f| *f = FaultConfig::default());
    }
}

impl TestApiServer {
    /// Starts a server on a random loopback port with an `admin` user allowed everything.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port)).await?;
        let addr = listener.local_addr()?;
        let (tempdir, dir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let shared = Arc::new(Shared {
            store: Store::new(options.history_limit),
            users: RwLock::new(HashMap::new()),
            faults: Mutex::new(FaultState::default()),
            fault_changed: watch::channel(0).0,
            log: Mutex::new(Vec::new()),
            watches: Default::default(),
            policies: admission::PolicyCache::default(),
            options,
            addr,
        });
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("test API server stopped: {e}");
            }
        });
        let mut server = TestApiServer {
            shared,
            dir,
            _tempdir: tempdir,
            task,
            admin: User {
                name: String::new(),
                token: String::new(),
                rules: vec![],
                extra: BTreeMap::new(),
            },
        };
        server.admin = server.add_user("admin", vec![Rule::all()]);
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The user allowed everything.
    pub fn admin(&self) -> &User {
        &self.admin
    }

    /// The store, for tests that set up or inspect objects directly.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Adds (or replaces) a user with a fresh token, and writes its kubeconfig.
    pub fn add_user(&self, name: &str, rules: Vec<Rule>) -> User {
        self.add_user_with_extra(name, rules, BTreeMap::new())
    }

    /// Adds a user whose token carries `extra` (see [`User::extra`]).
    pub fn add_user_with_extra(
        &self,
        name: &str,
        rules: Vec<Rule>,
        extra: BTreeMap<String, Vec<String>>,
    ) -> User {
        let token_prefix: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        self.register(User {
            name: name.to_string(),
            token: format!("{token_prefix}-{}", uuid::Uuid::new_v4().simple()),
            rules,
            extra,
        })
    }

    /// A service account's token bound to a pod on `node`, as the kubelet mounts it (1.32+ puts
    /// the node into it): user `system:serviceaccount:<namespace>:<name>`, with the node and
    /// pod names and uids in `extra`.
    pub fn add_bound_service_account(
        &self,
        namespace: &str,
        name: &str,
        pod: &str,
        node: &str,
        rules: Vec<Rule>,
    ) -> User {
        let id = || vec![uuid::Uuid::new_v4().to_string()];
        let extra = BTreeMap::from([
            (
                "authentication.kubernetes.io/credential-id".to_string(),
                vec![format!("JTI={}", uuid::Uuid::new_v4())],
            ),
            (NODE_NAME_EXTRA.to_string(), vec![node.to_string()]),
            ("authentication.kubernetes.io/node-uid".to_string(), id()),
            (
                "authentication.kubernetes.io/pod-name".to_string(),
                vec![pod.to_string()],
            ),
            ("authentication.kubernetes.io/pod-uid".to_string(), id()),
        ]);
        self.add_user_with_extra(&format!("system:serviceaccount:{namespace}:{name}"), rules, extra)
    }

    /// Lets requests without a bearer token in as `system:anonymous`, allowed `rules` (as a real
    /// cluster's RBAC can grant `system:unauthenticated`), and writes its kubeconfig, one with no
    /// credentials. This is how `kubectl` gets in: client-go sends bearer tokens only over
    /// HTTPS, and this server speaks HTTP.
    pub fn add_anonymous(&self, rules: Vec<Rule>) -> User {
        self.register(User {
            name: "system:anonymous".into(),
            token: String::new(),
            rules,
            extra: BTreeMap::new(),
        })
    }

    fn register(&self, user: User) -> User {
        self.shared
            .users
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.token.clone(), user.clone());
        if let Err(e) = std::fs::write(self.kubeconfig_path(&user), self.kubeconfig(&user)) {
            tracing::warn!("could not write kubeconfig for {}: {e}", user.name);
        }
        user
    }

    /// A kubeconfig (YAML) that makes `kube::Client` talk to this server as `user` (and
    /// `kubectl`, for the anonymous user: see [`TestApiServer::add_anonymous`]).
    pub fn kubeconfig(&self, user: &User) -> String {
        let credentials = match user.token.as_str() {
            "" => "{}".to_string(),
            token => format!("\n    token: {token}"),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: elector-test\n  cluster:\n    server: {url}\nusers:\n- name: {name}\n  user: {credentials}\ncontexts:\n- name: elector-test\n  context:\n    cluster: elector-test\n    user: {name}\n    namespace: default\ncurrent-context: elector-test\n",
            url = self.url(),
            name = user.name,
        )
    }

    /// Where the user's kubeconfig file is.
    pub fn kubeconfig_path(&self, user: &User) -> PathBuf {
        let name = user.name.strip_prefix("system:").unwrap_or(&user.name);
        let name = name.replace([':', '/'], "-");
        self.dir.join(format!("kubeconfig-{name}.yaml"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A kube client acting as `user`, built from its kubeconfig like any program would.
    pub async fn client(&self, user: &User) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig(user))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates any object this server serves (a Namespace, an admission policy, a Lease...), as
    /// the admin, through the API: it is validated as any client's would be. Returns the stored
    /// object.
    pub async fn create_object(&self, object: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource = resources::ALL
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .ok_or_else(|| anyhow::anyhow!("the test API server does not serve {api_version} {kind}"))?;
        let prefix = if resource.group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}/{}", resource.group, resource.version)
        };
        let path = if resource.namespaced {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or("default");
            format!("{prefix}/namespaces/{ns}/{}", resource.plural)
        } else {
            format!("{prefix}/{}", resource.plural)
        };
        let request = http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(object)?)?;
        let client = self.client(&self.admin).await?;
        Ok(serde_json::from_str(&client.request_text(request).await?)?)
    }

    /// Creates namespace `name` carrying `labels`.
    pub async fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        self.create_object(&serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .await
        .map(drop)
    }

    /// Fault control for one user.
    pub fn faults(&self, user: &User) -> Faults<'_> {
        Faults {
            shared: &self.shared,
            user: user.name.clone(),
        }
    }

    /// Pauses (`true`) or resumes the whole server: requests and watches of every user hang.
    pub fn pause(&self, on: bool) {
        self.shared.change_faults(|s| s.paused = on);
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<LogEntry> {
        self.shared.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every request of `users` answered so far.
    pub fn requests_by(&self, users: &[User]) -> Vec<LogEntry> {
        let mut log = self.requests();
        log.retain(|r| users.iter().any(|u| u.name == r.user));
        log
    }

    /// The requests of `users` refused with 403 Forbidden (by RBAC or an admission policy), as
    /// [`LogEntry::summary`].
    pub fn forbidden_requests_of(&self, users: &[User]) -> Vec<String> {
        self.requests_by(users)
            .iter()
            .filter(|r| r.status == 403)
            .map(LogEntry::summary)
            .collect()
    }

    /// Forgets the request log (to count from a point on).
    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Every watch started (since the last [`Self::reset_watch_stats`]), open or ended, with
    /// the events the server delivered on it.
    pub fn watch_stats(&self) -> Vec<WatchStats> {
        self.shared.watches.snapshot()
    }

    /// Forgets ended watches and zeroes the counts of open ones (to count from a point on).
    pub fn reset_watch_stats(&self) {
        self.shared.watches.reset();
    }
}
