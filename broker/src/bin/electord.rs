//! `electord`: the per-node leader-election broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use elector_broker::attest::{Attestor, PodCache};
use elector_broker::daemon::{Daemon, DaemonConfig, Readiness};
use elector_broker::election::ElectionTiming;
use elector_broker::lock::Backends;
use elector_broker::metrics::Metrics;
use elector_broker::registry::Defaults;
use elector_broker::registry::ShutdownMode;
use elector_broker::socket::{BrokerIdentity, Limits, SocketOptions};

/// Leader election for every pod of a Kubernetes node, done once per node.
#[derive(Debug, Parser)]
#[command(name = "electord", version)]
struct Args {
    /// Run without a cluster: locks live in memory (one node only). For laptops, demos, tests.
    #[arg(long, env = "ELECTOR_STANDALONE")]
    standalone: bool,

    /// kubeconfig to use; without it, the in-cluster service account (or $KUBECONFIG / ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Record Kubernetes Events on the lock object when leadership changes ("pod-a became
    /// leader"), rate-limited per lock; `--events=false`: none. Never in standalone mode.
    #[arg(long, env = "ELECTOR_EVENTS", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    events: bool,

    /// This node's name (from the downward API in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Namespace of elections whose requests name none.
    #[arg(long, env = "ELECTOR_DEFAULT_NAMESPACE", default_value = "default")]
    default_namespace: String,

    /// Unix socket applications connect to (its directory is created if missing).
    #[arg(long, env = "ELECTOR_SOCKET", default_value = elector_client::protocol::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,

    /// Permission bits of the socket file, in octal.
    #[arg(long, env = "ELECTOR_SOCKET_MODE", default_value = "666", value_parser = parse_octal)]
    socket_mode: u32,

    /// Numeric group id to own the socket file.
    #[arg(long, env = "ELECTOR_SOCKET_GROUP")]
    socket_group: Option<u32>,

    /// Address of /healthz, /readyz, /metrics and /elections (empty: none).
    #[arg(long, env = "ELECTOR_HTTP_ADDR", default_value = elector_broker::DEFAULT_HTTP_ADDR)]
    http_addr: String,

    /// Default lease duration, whole seconds.
    #[arg(long, env = "ELECTOR_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,

    /// Default renew deadline, seconds.
    #[arg(long, env = "ELECTOR_RENEW_DEADLINE", default_value_t = 10.0)]
    renew_deadline: f64,

    /// Default retry period, seconds.
    #[arg(long, env = "ELECTOR_RETRY_PERIOD", default_value_t = 2.0)]
    retry_period: f64,

    /// How long shutdown may take to release held locks.
    #[arg(long, env = "ELECTOR_SHUTDOWN_GRACE", default_value_t = 5.0)]
    shutdown_grace: f64,

    /// Take the socket over from a broker still running on it (a rolling upgrade with surge):
    /// the old broker notices, hands its leaders off (`jeopardy`, nothing released), and exits;
    /// they resume here. Without it a live broker on the socket is an error.
    #[arg(long, env = "ELECTOR_TAKEOVER")]
    takeover: bool,

    /// On SIGTERM: `release` tells local leaders `lost` and releases their locks (a node going
    /// away for good); `handoff` tells them `jeopardy` and releases nothing, so the next broker
    /// on this node resumes their leaderships (restarts, upgrades: the DaemonSet's choice).
    #[arg(long, env = "ELECTOR_ON_SHUTDOWN", value_enum, default_value_t = ShutdownMode::Release)]
    on_shutdown: ShutdownMode,

    /// Maximum client connections.
    #[arg(long, env = "ELECTOR_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,

    /// Who may campaign as whom: `kubernetes` attests each caller's pod (needs hostPID and pod
    /// list/watch); `none` trusts what clients say. Default: `kubernetes`, or `none` with
    /// --standalone.
    #[arg(long, env = "ELECTOR_ATTEST", value_enum)]
    attest: Option<AttestMode>,

    /// Where to read callers' /proc/<pid>/{cgroup,stat} (the host's /proc, with hostPID).
    #[arg(long, env = "ELECTOR_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,

    /// How long to wait for a just-started pod to appear in the pod watch before rejecting it.
    #[arg(long, env = "ELECTOR_ATTEST_WAIT", default_value_t = 3.0)]
    attest_wait: f64,

    /// Maximum client connections from one uid (many pods may share a uid).
    #[arg(long, env = "ELECTOR_MAX_CONNECTIONS_PER_UID", default_value_t = 1024)]
    max_connections_per_uid: usize,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,

    #[command(flatten)]
    logging: elector_broker::logging::LogArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AttestMode {
    Kubernetes,
    None,
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|e| format!("not an octal mode: {e}"))
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0,
        "{what} must be a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(v))
}

/// A kube client, and the API server's URL (named in logs and in `unknown` leader views).
async fn kube_client(kubeconfig: Option<PathBuf>) -> anyhow::Result<(kube::Client, String)> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    // Our election logic does its own back-off (and honours Retry-After) within its deadlines;
    // hidden retries would only blur them.
    config.default_retry = false;
    let url = config.cluster_url.to_string();
    Ok((kube::Client::try_from(config)?, url))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init(&args.log)?;

    let timing = ElectionTiming::new(
        Duration::from_secs(args.lease_duration),
        secs(args.renew_deadline, "--renew-deadline")?,
        secs(args.retry_period, "--retry-period")?,
    )
    .context("default timing")?;
    let node = match args.node_name.clone() {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into()),
    };
    let http_addr: Option<SocketAddr> = if args.http_addr.is_empty() {
        None
    } else {
        Some(args.http_addr.parse().context("--http-addr")?)
    };
    let config = DaemonConfig {
        socket: SocketOptions {
            path: args.socket.clone(),
            mode: args.socket_mode,
            group: args.socket_group,
            takeover: args.takeover,
        },
        identity: BrokerIdentity {
            node: node.clone(),
            default_namespace: args.default_namespace.clone(),
        },
        defaults: Defaults {
            timing,
            ..Defaults::default()
        },
        limits: Limits {
            max_connections: args.max_connections,
            max_connections_per_uid: args.max_connections_per_uid,
            ..Limits::default()
        },
        http_addr,
        shutdown_grace: secs(args.shutdown_grace, "--shutdown-grace")?,
        on_shutdown: args.on_shutdown,
        attestor: None,
    };
    let attest = args.attest.unwrap_or(if args.standalone {
        AttestMode::None
    } else {
        AttestMode::Kubernetes
    });
    anyhow::ensure!(
        !(args.standalone && attest == AttestMode::Kubernetes),
        "--attest=kubernetes needs a cluster (it watches this node's pods); use --attest=none with --standalone"
    );
    if attest == AttestMode::None {
        tracing::warn!(
            "--attest=none: any process that can reach the socket may campaign in any namespace under any identity"
        );
    }
    let mut config = config;

    let metrics = Arc::new(Metrics::new());
    let (backends, readiness) = if args.standalone {
        tracing::warn!("standalone mode: locks live in this process's memory; this is not for clusters");
        (Backends::memory(), Arc::new(Readiness::standalone()))
    } else {
        let (client, api_url) = kube_client(args.kubeconfig.clone()).await?;
        let readiness = Arc::new(Readiness::kubernetes(Duration::from_secs(30)));
        // /readyz needs to know the API answers even when no election is busy.
        let probe_client = client.clone();
        let probe_readiness = readiness.clone();
        tokio::spawn(async move {
            loop {
                if probe_client.apiserver_version().await.is_ok() {
                    probe_readiness.api_contact();
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        if attest == AttestMode::Kubernetes {
            tracing::info!(
                "--attest=kubernetes: only pods of this node may connect; {}",
                elector_broker::attest::WITHOUT_ATTESTATION
            );
            let pods = Arc::new(PodCache::default());
            pods.watch_node(client.clone(), &node);
            config.attestor = Some(Arc::new(Attestor::new(
                args.proc_root.clone(),
                pods,
                secs(args.attest_wait, "--attest-wait")?,
            )));
        }
        let backends = Backends::kubernetes(client, &node, Some(metrics.clone())).at(api_url);
        let backends = if args.events {
            backends
        } else {
            backends.without_events()
        };
        (backends, readiness)
    };

    let daemon = Daemon::start(config, backends, metrics, readiness).await?;
    if let Some(addr) = daemon.http_addr() {
        eprintln!(
            "electord: node {node}, socket {}, http {addr}",
            args.socket.display()
        );
    }

    let mut daemon = daemon;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mode = tokio::select! {
        _ = tokio::signal::ctrl_c() => args.on_shutdown,
        _ = term.recv() => args.on_shutdown,
        _ = daemon.superseded() => {
            // A successor took the socket over (rolling upgrade): hand the leaders off to it,
            // then wait, alive, for this pod to be stopped.
            tracing::info!("superseded by a new broker: handing leaders off, then idling until stopped");
            daemon.retire().await;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            ShutdownMode::Handoff
        }
    };
    match mode {
        ShutdownMode::Release => tracing::info!("stopping: telling leaders lost and releasing their leases"),
        ShutdownMode::Handoff => {
            tracing::info!("stopping: handing leaders off to the next broker, releasing nothing")
        }
    }
    daemon.shutdown_as(mode).await;
    Ok(())
}
