//! `electord`: the per-node leader-election broker.
//!
//! Each group of flags is a clap [`Args`](clap::Args) struct that turns itself into the part of
//! the configuration it is for (as kubert's `ClientArgs::try_client` does): [`ClusterArgs`] into
//! a kube client or standalone memory locks, [`SocketArgs`] into [`SocketOptions`],
//! [`TimingArgs`] into the default [`ElectionTiming`], [`LimitArgs`] into [`Limits`],
//! [`AttestArgs`] into an [`Attestor`], [`ShutdownArgs`] into the grace and mode. A bad flag is
//! reported, naming the flag, before anything is bound or contacted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use elector_broker::attest::{Attestor, PodCache};
use elector_broker::daemon::{Daemon, DaemonConfig, Readiness};
use elector_broker::election::ElectionTiming;
use elector_broker::http::{HttpLimits, ListingAccess};
use elector_broker::lock::Backends;
use elector_broker::metrics::Metrics;
use elector_broker::registry::Defaults;
use elector_broker::registry::ShutdownMode;
use elector_broker::socket::{BrokerIdentity, Limits, SocketOptions};

/// Leader election for every pod of a Kubernetes node, done once per node.
#[derive(Debug, Parser)]
#[command(name = "electord", version)]
struct Args {
    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(flatten)]
    identity: IdentityArgs,

    #[command(flatten)]
    socket: SocketArgs,

    /// Address of /healthz, /readyz, /metrics and /elections (empty: none).
    #[arg(long, env = "ELECTOR_HTTP_ADDR", default_value = elector_broker::DEFAULT_HTTP_ADDR)]
    http_addr: String,

    #[command(flatten)]
    http: HttpArgs,

    #[command(flatten)]
    timing: TimingArgs,

    #[command(flatten)]
    shutdown: ShutdownArgs,

    #[command(flatten)]
    limits: LimitArgs,

    #[command(flatten)]
    attest: AttestArgs,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,

    #[command(flatten)]
    logging: elector_broker::logging::LogArgs,
}

/// The HTTP server's limits, and who may read `/elections`.
#[derive(Debug, clap::Args)]
struct HttpArgs {
    /// Maximum HTTP connections at once (more wait in the backlog); clamped to an eighth of the
    /// open-file budget, so that the socket keeps the rest.
    #[arg(long, env = "ELECTOR_HTTP_MAX_CONNECTIONS", default_value_t = 256)]
    http_max_connections: usize,

    /// Seconds an HTTP client has to send a request's header (idle kept-alive connections
    /// too), and that a response may make no write progress, before its connection is closed.
    #[arg(long, env = "ELECTOR_HTTP_TIMEOUT", default_value_t = 10.0)]
    http_timeout: f64,

    /// Who may read /elections (every election and identity on the node): `local` (loopback
    /// only: `kubectl exec` into the pod) or `everyone` who reaches the port.
    #[arg(long, env = "ELECTOR_HTTP_ELECTIONS", value_enum, default_value_t = ListingAccess::Local)]
    http_elections: ListingAccess,
}

impl HttpArgs {
    fn limits(&self) -> anyhow::Result<HttpLimits> {
        let timeout = secs(self.http_timeout, "--http-timeout")?;
        Ok(HttpLimits {
            max_connections: self.http_max_connections,
            header_timeout: timeout,
            write_timeout: timeout,
            listing_access: self.http_elections,
            ..HttpLimits::default()
        })
    }
}

/// Where the locks live: the cluster (a kube client) or, with `--standalone`, this process.
#[derive(Debug, clap::Args)]
struct ClusterArgs {
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
}

/// A connection to the Kubernetes API, as [`ClusterArgs::try_client`] makes it.
struct Cluster {
    client: kube::Client,
    /// The API server's URL (named in logs and in `unknown` leader views).
    url: String,
}

impl ClusterArgs {
    /// A kube client, or `None` with `--standalone`.
    async fn try_client(&self) -> anyhow::Result<Option<Cluster>> {
        if self.standalone {
            return Ok(None);
        }
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
            }
            None => kube::Config::infer()
                .await
                .context("no in-cluster config and no kubeconfig")?,
        };
        // Our election logic does its own back-off (and honours Retry-After) within its
        // deadlines; hidden retries would only blur them.
        config.default_retry = false;
        let url = config.cluster_url.to_string();
        Ok(Some(Cluster {
            client: kube::Client::try_from(config)?,
            url,
        }))
    }
}

/// Who this broker is: its node, and the namespace of requests that name none.
#[derive(Debug, clap::Args)]
struct IdentityArgs {
    /// This node's name (from the downward API in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Namespace of elections whose requests name none.
    #[arg(long, env = "ELECTOR_DEFAULT_NAMESPACE", default_value = "default")]
    default_namespace: String,
}

impl IdentityArgs {
    /// `--node-name`, or the host name, or `localhost`.
    fn broker_identity(&self) -> BrokerIdentity {
        let node = self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        });
        BrokerIdentity {
            node,
            default_namespace: self.default_namespace.clone(),
        }
    }
}

/// The Unix socket applications connect to.
#[derive(Debug, clap::Args)]
struct SocketArgs {
    /// Unix socket applications connect to (its directory is created if missing).
    #[arg(long, env = "ELECTOR_SOCKET", default_value = elector_client::protocol::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,

    /// Permission bits of the socket file, in octal.
    #[arg(long, env = "ELECTOR_SOCKET_MODE", default_value = "666", value_parser = parse_octal)]
    socket_mode: u32,

    /// Numeric group id to own the socket file.
    #[arg(long, env = "ELECTOR_SOCKET_GROUP")]
    socket_group: Option<u32>,

    /// Take the socket over from a broker still running on it (a rolling upgrade with surge):
    /// the old broker notices and moves its connections here a few at a time (`jeopardy`,
    /// nothing released, `reconnect`), then idles until stopped; its leaders resume here.
    /// Without it a live broker on the socket is an error.
    #[arg(long, env = "ELECTOR_TAKEOVER")]
    takeover: bool,
}

impl SocketArgs {
    fn socket_options(&self) -> SocketOptions {
        SocketOptions {
            path: self.socket.clone(),
            mode: self.socket_mode,
            group: self.socket_group,
            takeover: self.takeover,
        }
    }
}

/// The timing of elections whose campaigns state none.
#[derive(Debug, clap::Args)]
struct TimingArgs {
    /// Default lease duration, whole seconds.
    #[arg(long, env = "ELECTOR_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,

    /// Default renew deadline, seconds.
    #[arg(long, env = "ELECTOR_RENEW_DEADLINE", default_value_t = 10.0)]
    renew_deadline: f64,

    /// Default retry period, seconds.
    #[arg(long, env = "ELECTOR_RETRY_PERIOD", default_value_t = 2.0)]
    retry_period: f64,
}

impl TimingArgs {
    fn election_timing(&self) -> anyhow::Result<ElectionTiming> {
        ElectionTiming::new(
            Duration::from_secs(self.lease_duration),
            secs(self.renew_deadline, "--renew-deadline")?,
            secs(self.retry_period, "--retry-period")?,
        )
        .context("default timing")
    }
}

/// What SIGTERM does.
#[derive(Debug, clap::Args)]
struct ShutdownArgs {
    /// How long shutdown may take to release held locks.
    #[arg(long, env = "ELECTOR_SHUTDOWN_GRACE", default_value_t = 5.0)]
    shutdown_grace: f64,

    /// On SIGTERM: `release` tells local leaders `lost` and releases their locks (a node going
    /// away for good); `handoff` tells them `jeopardy` and releases nothing, so the next broker
    /// on this node resumes their leaderships (restarts, upgrades: the DaemonSet's choice).
    #[arg(long, env = "ELECTOR_ON_SHUTDOWN", value_enum, default_value_t = ShutdownMode::Release)]
    on_shutdown: ShutdownMode,
}

impl ShutdownArgs {
    fn grace(&self) -> anyhow::Result<Duration> {
        secs(self.shutdown_grace, "--shutdown-grace")
    }
}

/// How many clients may connect.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Maximum client connections.
    #[arg(long, env = "ELECTOR_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,

    /// Maximum client connections from one uid (many pods may share a uid).
    #[arg(long, env = "ELECTOR_MAX_CONNECTIONS_PER_UID", default_value_t = 1024)]
    max_connections_per_uid: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections,
            max_connections_per_uid: self.max_connections_per_uid,
            ..Limits::default()
        }
    }
}

/// Who may campaign as whom.
#[derive(Debug, clap::Args)]
struct AttestArgs {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AttestMode {
    Kubernetes,
    None,
}

impl AttestArgs {
    /// The attestation mode: as given, else `kubernetes` with a cluster and `none` without.
    fn mode(&self, standalone: bool) -> anyhow::Result<AttestMode> {
        let default = if standalone {
            AttestMode::None
        } else {
            AttestMode::Kubernetes
        };
        let mode = self.attest.unwrap_or(default);
        anyhow::ensure!(
            !(standalone && mode == AttestMode::Kubernetes),
            "--attest=kubernetes needs a cluster (it watches this node's pods); use --attest=none with --standalone"
        );
        if mode == AttestMode::None {
            tracing::warn!(
                "--attest=none: any process that can reach the socket may campaign in any namespace under any identity"
            );
        }
        Ok(mode)
    }

    /// The attestor for `mode` (`None` for `--attest=none`); with `kubernetes` it watches
    /// `node`'s pods through the cluster's client from now on.
    fn attestor(
        &self,
        mode: AttestMode,
        cluster: &Cluster,
        node: &str,
    ) -> anyhow::Result<Option<Arc<Attestor>>> {
        if mode == AttestMode::None {
            return Ok(None);
        }
        let wait = secs(self.attest_wait, "--attest-wait")?;
        tracing::info!(
            "--attest=kubernetes: only pods of this node may connect; {}",
            elector_broker::attest::WITHOUT_ATTESTATION
        );
        let pods = Arc::new(PodCache::default());
        pods.watch_node(cluster.client.clone(), node);
        Ok(Some(Arc::new(Attestor::new(self.proc_root.clone(), pods, wait))))
    }
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

fn http_addr(flag: &str) -> anyhow::Result<Option<SocketAddr>> {
    if flag.is_empty() {
        return Ok(None);
    }
    Ok(Some(flag.parse().context("--http-addr")?))
}

impl Cluster {
    /// `/readyz`'s view of the API: it must answer within 30 s, also when no election is busy,
    /// so a probe asks for its version every 10 s.
    fn readiness(&self) -> Arc<Readiness> {
        let readiness = Arc::new(Readiness::kubernetes(Duration::from_secs(30)));
        let probe_client = self.client.clone();
        let probe_readiness = readiness.clone();
        tokio::spawn(async move {
            loop {
                if probe_client.apiserver_version().await.is_ok() {
                    probe_readiness.api_contact();
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        readiness
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.logging.init(&args.log)?;

    // Every flag is checked before anything is bound or contacted.
    let identity = args.identity.broker_identity();
    let node = identity.node.clone();
    let mut config = DaemonConfig {
        socket: args.socket.socket_options(),
        identity,
        defaults: Defaults {
            timing: args.timing.election_timing()?,
            ..Defaults::default()
        },
        limits: args.limits.limits(),
        http_addr: http_addr(&args.http_addr)?,
        http: args.http.limits()?,
        shutdown_grace: args.shutdown.grace()?,
        on_shutdown: args.shutdown.on_shutdown,
        attestor: None,
    };
    let attest = args.attest.mode(args.cluster.standalone)?;

    let metrics = Arc::new(Metrics::new());
    let (backends, readiness) = match args.cluster.try_client().await? {
        None => {
            tracing::warn!("standalone mode: locks live in this process's memory; this is not for clusters");
            (Backends::memory(), Arc::new(Readiness::standalone()))
        }
        Some(cluster) => {
            let readiness = cluster.readiness();
            config.attestor = args.attest.attestor(attest, &cluster, &node)?;
            let backends = Backends::kubernetes(cluster.client, &node, Some(metrics.clone())).at(cluster.url);
            let backends = if args.cluster.events {
                backends
            } else {
                backends.without_events()
            };
            (backends, readiness)
        }
    };

    let mut daemon = Daemon::start(config, backends, metrics, readiness).await?;
    if let Some(addr) = daemon.http_addr() {
        eprintln!(
            "electord: node {node}, socket {}, http {addr}",
            args.socket.socket.display()
        );
    }
    let mode = until_stopped(&mut daemon, args.shutdown.on_shutdown).await?;
    match mode {
        ShutdownMode::Release => tracing::info!("stopping: telling leaders lost and releasing their leases"),
        ShutdownMode::Handoff => {
            tracing::info!("stopping: handing leaders off to the next broker, releasing nothing")
        }
    }
    daemon.shutdown_as(mode).await;
    Ok(())
}

/// Waits for SIGINT or SIGTERM, then says how to shut down: as `on_signal` says, or by
/// handing off while superseded. A successor taking the socket over (a rolling upgrade) does
/// not stop this broker: it moves every connection there, then stays alive until stopped (its
/// pod deleted), taking the path back if the successor goes away meanwhile.
async fn until_stopped(daemon: &mut Daemon, on_signal: ShutdownMode) -> anyhow::Result<ShutdownMode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(on_signal),
            _ = term.recv() => return Ok(on_signal),
            _ = daemon.superseded() => {}
        }
        tracing::info!(
            "superseded by a new broker: moving every connection to it, then idling until stopped"
        );
        tokio::select! {
            // Stopped while superseded: whatever was not moved yet is handed off.
            _ = tokio::signal::ctrl_c() => return Ok(ShutdownMode::Handoff),
            _ = term.recv() => return Ok(ShutdownMode::Handoff),
            _ = daemon.serving() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("electord").chain(flags.iter().copied())).unwrap()
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn each_group_converts_itself() {
        let args = parse(&[
            "--socket=/run/x.sock",
            "--socket-mode=0o640",
            "--takeover",
            "--lease-duration=20",
            "--renew-deadline=12.5",
            "--retry-period=3",
            "--max-connections=7",
            "--node-name=n1",
            "--http-addr=",
        ]);
        let socket = args.socket.socket_options();
        assert_eq!(
            (socket.path, socket.mode, socket.takeover),
            ("/run/x.sock".into(), 0o640, true)
        );
        let timing = args.timing.election_timing().unwrap();
        assert_eq!(timing.lease_duration, Duration::from_secs(20));
        assert_eq!(timing.renew_deadline, Duration::from_millis(12_500));
        assert_eq!(args.limits.limits().max_connections, 7);
        assert_eq!(args.identity.broker_identity().node, "n1");
        assert_eq!(http_addr(&args.http_addr).unwrap(), None);
    }

    #[test]
    fn a_bad_flag_is_named() {
        let args = parse(&["--renew-deadline=-1"]);
        let e = args.timing.election_timing().unwrap_err();
        assert!(e.to_string().contains("--renew-deadline"), "{e}");
        let e = parse(&["--shutdown-grace=0"]).shutdown.grace().unwrap_err();
        assert!(e.to_string().contains("--shutdown-grace"), "{e}");
        let e = http_addr("nowhere").unwrap_err();
        assert!(e.to_string().contains("--http-addr"), "{e}");
        let args = parse(&["--standalone", "--attest=kubernetes"]);
        let e = args.attest.mode(args.cluster.standalone).unwrap_err();
        assert!(e.to_string().contains("--attest=kubernetes"), "{e}");
        let args = parse(&["--standalone"]);
        assert_eq!(
            args.attest.mode(args.cluster.standalone).unwrap(),
            AttestMode::None
        );
        let args = parse(&[]);
        assert_eq!(
            args.attest.mode(args.cluster.standalone).unwrap(),
            AttestMode::Kubernetes
        );
    }
}
