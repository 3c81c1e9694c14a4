//! A whole broker: elections, the socket server and the HTTP server, started and stopped
//! together. `electord` is a thin command line around [`Daemon`]; tests start it in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::lock::Backends;
use crate::metrics::Metrics;
use crate::registry::{Defaults, Elections, ShutdownMode};
use crate::socket::{self, BrokerIdentity, Limits, SocketOptions, SocketServer};

/// What `/readyz` checks.
#[derive(Debug)]
pub struct Readiness {
    /// `None` in standalone mode: there is no API to reach.
    last_api_contact: Option<Mutex<Option<Instant>>>,
    window: Duration,
}

impl Readiness {
    pub fn standalone() -> Self {
        Readiness {
            last_api_contact: None,
            window: Duration::ZERO,
        }
    }

    pub fn kubernetes(window: Duration) -> Self {
        Readiness {
            last_api_contact: Some(Mutex::new(None)),
            window,
        }
    }

    pub fn api_contact(&self) {
        if let Some(m) = &self.last_api_contact {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    pub fn check(&self) -> Result<(), String> {
        let Some(m) = &self.last_api_contact else {
            return Ok(());
        };
        match *m.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(t) if t.elapsed() <= self.window => Ok(()),
            Some(t) => Err(format!("the Kubernetes API last answered {:?} ago", t.elapsed())),
            None => Err("the Kubernetes API has not answered yet".into()),
        }
    }
}

/// Everything a broker needs to start.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: SocketOptions,
    pub identity: BrokerIdentity,
    pub defaults: Defaults,
    pub limits: Limits,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/elections` are served (`None`: nowhere).
    pub http_addr: Option<SocketAddr>,
    /// How long shutdown may take to release held locks.
    pub shutdown_grace: Duration,
    /// Release held locks on shutdown, or hand them off to a successor broker.
    pub on_shutdown: ShutdownMode,
    /// `Some`: attest every caller (`--attest=kubernetes`).
    pub attestor: Option<Arc<crate::attest::Attestor>>,
}

impl DaemonConfig {
    /// A configuration for tests and examples: socket at `path`, no HTTP, default limits.
    pub fn for_socket(path: impl Into<PathBuf>, node: &str) -> Self {
        DaemonConfig {
            socket: SocketOptions {
                path: path.into(),
                mode: 0o660,
                group: None,
                takeover: false,
            },
            identity: BrokerIdentity {
                node: node.to_string(),
                default_namespace: "default".into(),
            },
            defaults: Defaults::default(),
            limits: Limits::default(),
            http_addr: None,
            shutdown_grace: Duration::from_secs(5),
            on_shutdown: ShutdownMode::Release,
            attestor: None,
        }
    }
}

/// Errors starting a broker.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("socket: {0}")]
    Socket(#[from] socket::SocketError),
    #[error("HTTP listener on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running broker.
#[derive(Debug)]
pub struct Daemon {
    elections: Elections,
    socket_shutdown: CancellationToken,
    http_shutdown: CancellationToken,
    socket_task: Option<tokio::task::JoinHandle<()>>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    http_addr: Option<SocketAddr>,
    grace: Duration,
    on_shutdown: ShutdownMode,
    superseded: CancellationToken,
    events: Option<crate::events::LeadershipEvents>,
}

impl Daemon {
    /// Binds the socket (and HTTP port) and starts serving.
    pub async fn start(
        config: DaemonConfig,
        backends: Backends,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Result<Self, DaemonError> {
        let events = backends.events.clone();
        let elections = Elections::new(backends, config.defaults, Some(metrics));
        let bound = socket::bind(&config.socket)?;
        let socket_shutdown = CancellationToken::new();
        let http_shutdown = CancellationToken::new();
        let server = SocketServer::new(
            bound,
            elections.clone(),
            config.identity.clone(),
            config.limits.clone(),
            socket_shutdown.clone(),
            config.attestor.clone(),
        );
        let superseded = server.superseded();
        let socket_task = tokio::spawn(server.run());
        let (http_task, http_addr) = match config.http_addr {
            Some(addr) => {
                let listener = crate::http::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Http { addr, source })?;
                let bound = listener.local_addr().ok();
                let task = tokio::spawn(crate::http::serve(
                    listener,
                    elections.clone(),
                    readiness,
                    http_shutdown.clone(),
                ));
                (Some(task), bound)
            }
            None => (None, None),
        };
        tracing::info!(
            socket = %config.socket.path.display(),
            http = ?http_addr,
            node = %config.identity.node,
            "electord serving"
        );
        Ok(Daemon {
            elections,
            socket_shutdown,
            http_shutdown,
            socket_task: Some(socket_task),
            http_task,
            http_addr,
            grace: config.shutdown_grace,
            on_shutdown: config.on_shutdown,
            superseded,
            events,
        })
    }

    /// A standalone broker (`electord --standalone`): memory locks, fresh metrics, always
    /// ready.
    pub async fn start_standalone(config: DaemonConfig) -> Result<Self, DaemonError> {
        Self::start(
            config,
            Backends::memory(),
            Arc::new(Metrics::new()),
            Arc::new(Readiness::standalone()),
        )
        .await
    }

    pub fn elections(&self) -> &Elections {
        &self.elections
    }

    /// The bound HTTP address, if serving HTTP.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Clean shutdown, as `on_shutdown` says. `release`: every local leader is told `lost`
    /// (`broker_shutdown`) and every held lock is released, so other nodes take over at once.
    /// `handoff`: every local leader is told `jeopardy` with its guarantee and nothing is
    /// written, so a successor broker resumes the leaderships. Then connections are flushed and
    /// closed and the socket file is removed (if still this broker's).
    pub async fn shutdown(self) {
        let mode = self.on_shutdown;
        self.shutdown_as(mode).await;
    }

    /// Resolves when a successor broker has taken the socket path over (a rolling upgrade with
    /// `--takeover`): then [`Daemon::shutdown_as`] with [`ShutdownMode::Handoff`], so the
    /// leaders of this broker resume at the successor.
    pub async fn superseded(&self) {
        self.superseded.cancelled().await;
    }

    /// After a successor took the socket over: hand every leader off (`jeopardy`, nothing
    /// released) and close the socket's connections, but stay alive (`/healthz` keeps
    /// answering) until told to stop. A superseded broker that exited would be restarted in its
    /// pod and take the socket back.
    pub async fn retire(&mut self) {
        self.elections.shutdown(self.grace, ShutdownMode::Handoff).await;
        self.socket_shutdown.cancel();
        if let Some(task) = self.socket_task.take() {
            let _ = tokio::time::timeout(self.grace, task).await;
        }
    }

    /// Shutdown in a given mode (see [`Daemon::shutdown`]).
    pub async fn shutdown_as(self, mode: ShutdownMode) {
        self.elections.shutdown(self.grace, mode).await;
        // The `released` Events of the leaders just released, before the process goes.
        if let Some(events) = &self.events {
            events.flush(Duration::from_secs(2)).await;
        }
        self.socket_shutdown.cancel();
        if let Some(task) = self.socket_task {
            let _ = tokio::time::timeout(self.grace, task).await;
        }
        self.http_shutdown.cancel();
        if let Some(t) = self.http_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
    }
}
