//! A whole broker: elections, the socket server and the HTTP server, started and stopped
//! together. `electord` is a thin command line around [`Daemon`]; tests start it in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::HttpLimits;
pub use crate::http::Readiness;
use crate::lock::Backends;
use crate::metrics::Metrics;
use crate::registry::{Defaults, Elections, ShutdownMode};
use crate::socket::{self, BrokerIdentity, Limits, PathState, SocketOptions, SocketServer};

/// File descriptors kept for the broker itself, outside both connection limits: the runtime,
/// the Kubernetes client's connections and watches, the socket's lock file, `/proc` reads while
/// attesting, and the socket server's spare descriptor (to refuse clients on `EMFILE`).
pub const RESERVED_FDS: u64 = 64;

/// HTTP gets at most one part in this many of the descriptors left after the reserve; the rest
/// is the election socket's, so no HTTP load can take them.
const HTTP_FD_SHARE: u64 = 8;

/// How the process's file descriptors are shared out (see [`FdBudget::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft `RLIMIT_NOFILE` in force.
    pub limit: u64,
    /// Socket client connections allowed (`--max-connections`, clamped).
    pub socket_connections: usize,
    /// HTTP connections allowed (`--http-max-connections`, clamped; 0 without HTTP).
    pub http_connections: usize,
}

impl FdBudget {
    /// Raises the soft `RLIMIT_NOFILE` to the hard limit (best effort) and returns the soft
    /// limit in force afterwards.
    pub fn raise_nofile_limit() -> u64 {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return 1024;
        };
        if soft < hard {
            // An unlimited hard limit is capped by the kernel's nr_open (1Mi by default).
            let target = hard.min(1 << 20);
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {target}: {e}");
                return soft;
            }
            return target;
        }
        soft
    }

    /// Shares `limit` descriptors out: [`RESERVED_FDS`] for the broker, at most an eighth of the
    /// rest for HTTP, the remainder for the election socket; each limit is what was asked for
    /// when it fits.
    pub fn plan(limit: u64, socket_wanted: usize, http_wanted: usize) -> FdBudget {
        let available = limit.saturating_sub(RESERVED_FDS);
        let http_room = usize::try_from((available / HTTP_FD_SHARE).max(1)).unwrap_or(usize::MAX);
        let http_connections = http_wanted.min(http_room);
        let socket_room = usize::try_from(available)
            .unwrap_or(usize::MAX)
            .saturating_sub(http_connections)
            .max(1);
        FdBudget {
            limit,
            socket_connections: socket_wanted.min(socket_room),
            http_connections,
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
    /// Limits of the HTTP server (its connection cap is clamped to the fd budget).
    pub http: HttpLimits,
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
            http: HttpLimits::default(),
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
    path_state: tokio::sync::watch::Receiver<PathState>,
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
        let mut config = config;
        let budget = FdBudget::plan(
            FdBudget::raise_nofile_limit(),
            config.limits.max_connections,
            if config.http_addr.is_some() {
                config.http.max_connections
            } else {
                0
            },
        );
        if budget.socket_connections < config.limits.max_connections
            || (config.http_addr.is_some() && budget.http_connections < config.http.max_connections)
        {
            tracing::warn!(
                open_file_limit = budget.limit,
                max_connections = budget.socket_connections,
                http_max_connections = budget.http_connections,
                "the open-file limit cannot hold the connection limits asked for: clamped (raise the pod's or the runtime's RLIMIT_NOFILE)"
            );
        } else {
            tracing::info!(
                open_file_limit = budget.limit,
                max_connections = budget.socket_connections,
                http_max_connections = budget.http_connections,
                "file descriptor budget"
            );
        }
        config.limits.max_connections = budget.socket_connections;
        config.limits.max_connections_per_uid = config
            .limits
            .max_connections_per_uid
            .min(budget.socket_connections);
        config.http.max_connections = budget.http_connections.max(1);
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
        let path_state = server.path_state();
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
                    config.http.clone(),
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
            path_state,
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

    /// Resolves when a successor broker has taken the socket path over (a rolling upgrade
    /// with `--takeover`): every connection then moves to it, a few at a time (each leader is
    /// told `jeopardy`, nothing is released, and the client is told `reconnect`), while the
    /// leaders not yet moved are renewed here. A superseded broker should stay alive until it
    /// is told to stop, and then stop with [`ShutdownMode::Handoff`]: if it exited, its pod
    /// would restart it and it would take the socket back; and while it lives it takes the
    /// path back by itself if the successor goes away (see [`Daemon::serving`]).
    pub async fn superseded(&mut self) {
        if self
            .path_state
            .wait_for(|s| matches!(s, PathState::Superseded { .. }))
            .await
            .is_err()
        {
            // The socket server is gone: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when this broker serves its socket path: at once unless superseded, else when
    /// it took the path back from a successor that went away (died, or was stopped while this
    /// broker still runs: a release that crashes, a rollback).
    pub async fn serving(&mut self) {
        if self
            .path_state
            .wait_for(|s| *s == PathState::Serving)
            .await
            .is_err()
        {
            // The socket server is gone: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }

    /// Shutdown in a given mode (see [`Daemon::shutdown`]). A broker superseded by a
    /// successor always hands off, whatever `mode` says: its connections belong to the
    /// successor now (moved, or about to be), and a release would end leaderships that the
    /// successor serves. So a stop that races the takeover (the signal handled before the
    /// takeover was noticed) releases nothing either.
    pub async fn shutdown_as(self, mode: ShutdownMode) {
        let superseded = matches!(*self.path_state.borrow(), PathState::Superseded { .. });
        let mode = if superseded && mode == ShutdownMode::Release {
            tracing::info!("superseded by a new broker: handing off instead of releasing");
            ShutdownMode::Handoff
        } else {
            mode
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_budget_keeps_the_socket_its_share() {
        // Plenty: everything as asked.
        assert_eq!(
            FdBudget::plan(1 << 20, 4096, 256),
            FdBudget {
                limit: 1 << 20,
                socket_connections: 4096,
                http_connections: 256
            }
        );
        // 1024 descriptors: 960 after the reserve, HTTP gets at most 120, the socket the rest.
        let b = FdBudget::plan(1024, 4096, 256);
        assert_eq!((b.socket_connections, b.http_connections), (840, 120));
        // No HTTP: all of it for the socket.
        assert_eq!(FdBudget::plan(1024, 4096, 0).socket_connections, 960);
        // Absurdly low limits still leave one of each.
        let b = FdBudget::plan(10, 4096, 256);
        assert_eq!((b.socket_connections, b.http_connections), (1, 1));
    }
}
