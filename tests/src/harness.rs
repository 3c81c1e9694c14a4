//! In-process brokers for tests, each on its own runtime and thread, so that killing one drops
//! every task it had (like a crashed process: no release, connections closed), while a clean
//! shutdown goes through `Daemon::shutdown` like SIGTERM does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use elector_broker::daemon::{Daemon, DaemonConfig, Readiness};
use elector_broker::election::ElectionTiming;
use elector_broker::lock::Backends;
use elector_broker::metrics::Metrics;
use elector_broker::registry::{Defaults, ShutdownMode};

use crate::kube_api::{TestApiServer, User};

/// Where a test broker's locks live.
#[derive(Debug, Clone)]
pub enum Backend {
    Memory,
    /// A kubeconfig file (a user of the test API server, or a real cluster).
    Kube(PathBuf),
}

#[derive(Debug)]
enum Stop {
    Shutdown,
    Kill,
}

/// A thread running something on its own runtime, stopped by message (and killed when dropped).
#[derive(Debug)]
struct BackgroundThread {
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundThread {
    fn stop(&mut self, how: Stop) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(how);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BackgroundThread {
    fn drop(&mut self) {
        self.stop(Stop::Kill);
    }
}

/// A broker running on its own thread.
#[derive(Debug)]
pub struct TestBroker {
    pub node: String,
    pub socket: PathBuf,
    pub http_addr: Option<std::net::SocketAddr>,
    background: BackgroundThread,
}

/// Fast timing for tests: lease 2 s, renew deadline 1.5 s, retry 0.25 s.
pub fn fast_timing() -> ElectionTiming {
    ElectionTiming::new(
        Duration::from_secs(2),
        Duration::from_millis(1500),
        Duration::from_millis(250),
    )
    .expect("valid timing")
}

impl TestBroker {
    /// Starts a broker; `settings` is an [`ElectionTiming`] or, to also skew its wall clock,
    /// a [`Defaults`].
    pub fn start(
        node: &str,
        dir: &Path,
        backend: Backend,
        settings: impl Into<Defaults>,
        http: bool,
    ) -> TestBroker {
        Self::start_attested(node, dir, backend, settings, http, None)
    }

    /// Like [`TestBroker::start`], attesting callers from `proc_root` and this node's pods
    /// (needs a Kube backend).
    pub fn start_attested(
        node: &str,
        dir: &Path,
        backend: Backend,
        settings: impl Into<Defaults>,
        http: bool,
        proc_root: Option<PathBuf>,
    ) -> TestBroker {
        Self::start_configured(node, dir, backend, settings, http, proc_root, |_| {})
    }

    /// Like [`TestBroker::start_attested`], with a last say on the configuration.
    pub fn start_configured(
        node: &str,
        dir: &Path,
        backend: Backend,
        settings: impl Into<Defaults>,
        http: bool,
        proc_root: Option<PathBuf>,
        configure: impl FnOnce(&mut DaemonConfig),
    ) -> TestBroker {
        let socket = dir.join(format!("{node}.sock"));
        let mut config = DaemonConfig::for_socket(&socket, node);
        config.defaults = settings.into();
        config.shutdown_grace = Duration::from_secs(3);
        if http {
            config.http_addr = Some("127.0.0.1:0".parse().expect("addr"));
        }
        configure(&mut config);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
        let thread = std::thread::Builder::new()
            .name(format!("broker-{node}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name(format!("broker-{}", config.identity.node))
                    .enable_all()
                    .build()
                    .expect("runtime");
                let node_name = config.identity.node.clone();
                let daemon = rt.block_on(async {
                    let metrics = Arc::new(Metrics::new());
                    let backends = match backend {
                        Backend::Memory => Backends::memory(),
                        Backend::Kube(kubeconfig) => {
                            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                            let mut cfg = kube::Config::from_custom_kubeconfig(
                                kc,
                                &kube::config::KubeConfigOptions::default(),
                            )
                            .await
                            .expect("kube config");
                            cfg.default_retry = false;
                            let client = kube::Client::try_from(cfg).expect("client");
                            if let Some(root) = proc_root {
                                let pods = Arc::new(elector_broker::attest::PodCache::default());
                                pods.watch_node(client.clone(), &node_name);
                                config.attestor = Some(Arc::new(elector_broker::attest::Attestor::new(
                                    root,
                                    pods,
                                    Duration::from_millis(700),
                                )));
                            }
                            Backends::kubernetes(client, &node_name, Some(metrics.clone()))
                        }
                    };
                    Daemon::start(config, backends, metrics, Arc::new(Readiness::standalone()))
                        .await
                        .expect("daemon starts")
                });
                let _ = ready_tx.send(daemon.http_addr());
                // As electord does: superseded by a successor, it moves every connection there
                // and lives on until stopped (then hands off), taking the path back if the
                // successor goes away.
                let mut daemon = daemon;
                let stop = rt.block_on(async {
                    let mut stop_rx = stop_rx;
                    loop {
                        tokio::select! {
                            stop = &mut stop_rx => return stop.ok(),
                            _ = daemon.superseded() => {}
                        }
                        tokio::select! {
                            stop = &mut stop_rx => return stop.ok().filter(|s| matches!(s, Stop::Kill)),
                            _ = daemon.serving() => {}
                        }
                    }
                });
                match stop {
                    Some(Stop::Shutdown) => rt.block_on(daemon.shutdown()),
                    None => rt.block_on(daemon.shutdown_as(ShutdownMode::Handoff)),
                    Some(Stop::Kill) => {
                        drop(daemon);
                        rt.shutdown_background();
                    }
                }
            })
            .expect("spawn broker thread");
        let http_addr = ready_rx.recv().expect("broker started");
        TestBroker {
            node: node.to_string(),
            socket,
            http_addr,
            background: BackgroundThread {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
        }
    }

    /// A broker of the test API server, as its own user (so faults can target it).
    pub fn on_server(
        server: &TestApiServer,
        node: &str,
        dir: &Path,
        settings: impl Into<Defaults>,
    ) -> (TestBroker, User) {
        let user = server.add_user(node, vec![crate::kube_api::Rule::all()]);
        let broker = TestBroker::start(
            node,
            dir,
            Backend::Kube(server.kubeconfig_path(&user)),
            settings,
            true,
        );
        (broker, user)
    }

    /// Crash: every task is dropped, nothing is released.
    pub fn kill(mut self) {
        self.background.stop(Stop::Kill);
    }

    /// SIGTERM: release, tell leaders `broker_shutdown`, remove the socket.
    pub fn shutdown(mut self) {
        self.background.stop(Stop::Shutdown);
    }
}

/// An `elector-shim` running on its own thread (killable like a process).
#[derive(Debug)]
pub struct TestShim {
    pub id: String,
    pub http_addr: std::net::SocketAddr,
    background: BackgroundThread,
}

impl TestShim {
    /// Starts a shim for `election` (namespace `default`) on `http` (e.g. `127.0.0.1:0`).
    pub fn start(socket: &Path, election: &str, id: &str, ttl: Duration, http: &str) -> TestShim {
        let config = elector_broker::shim::ShimConfig {
            election: election.to_string(),
            namespace: "default".into(),
            id: id.to_string(),
            ttl,
            socket: socket.to_path_buf(),
        };
        let std_listener = std::net::TcpListener::bind(http).expect("bind shim port");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let http_addr = std_listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let token = tokio_util::sync::CancellationToken::new();
            let listener =
                rt.block_on(async { tokio::net::TcpListener::from_std(std_listener).expect("listener") });
            let task = rt.spawn(elector_broker::shim::run(config, Some(listener), token.clone()));
            match rt.block_on(stop_rx) {
                Ok(Stop::Shutdown) => {
                    token.cancel();
                    let _ = rt.block_on(task);
                }
                Ok(Stop::Kill) | Err(_) => rt.shutdown_background(),
            }
        });
        TestShim {
            id: id.to_string(),
            http_addr,
            background: BackgroundThread {
                stop: Some(stop_tx),
                thread: Some(thread),
            },
        }
    }

    /// Like `kill -9` of the sidecar: its socket connection just closes.
    pub fn kill(mut self) {
        self.background.stop(Stop::Kill);
    }
}
