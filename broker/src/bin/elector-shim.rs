//! `elector-shim`: the 2016 `leader-elector` sidecar's interface (`{"name":...}` on :4040),
//! campaigning through the node's elector broker instead of talking to the Kubernetes API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use elector_broker::shim::{self, ShimConfig};
use tokio_util::sync::CancellationToken;

/// elector-shim: a drop-in for the 2016 leader-elector sidecar
/// (gcr.io/google_containers/leader-elector). Serves {"name":"<leader>"} over HTTP and
/// campaigns through the node's elector broker (electord) over its Unix socket, with no
/// Kubernetes credentials of its own.
///
/// Exits non-zero with the broker's message when a campaign can never succeed (e.g.
/// invalid_election for an election name that is not a valid object name); retries while the
/// broker is unreachable.
#[derive(Debug, Parser)]
#[command(name = "elector-shim", version)]
struct Args {
    /// The name of the election.
    #[arg(long)]
    election: String,
    /// The Kubernetes namespace of the election.
    #[arg(long = "election-namespace", default_value = "default")]
    election_namespace: String,
    /// This candidate's id (default: the hostname, i.e. the pod name).
    #[arg(long)]
    id: Option<String>,
    /// The lease duration, in Go's syntax (10s, 1m30s, 1.5m), whole seconds, at least 2s;
    /// the renew deadline is ttl/2, the retry period ttl/4.
    #[arg(long, default_value = "10s", value_parser = shim::parse_go_duration)]
    ttl: Duration,
    /// Where to serve {"name":...}, e.g. 0.0.0.0:4040; empty: no HTTP server.
    #[arg(long, default_value = "")]
    http: String,
    /// Maximum HTTP connections at once (more wait in the backlog).
    #[arg(long, default_value_t = 256)]
    http_max_connections: usize,
    /// Seconds an HTTP client has to send a request's header (idle kept-alive connections too),
    /// and that a response may make no write progress, before its connection is closed.
    #[arg(long, default_value_t = 10.0)]
    http_timeout: f64,
    /// The elector broker's socket.
    #[arg(long, env = "ELECTOR_SOCKET", default_value = elector_client::protocol::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,

    #[command(flatten)]
    logging: elector_broker::logging::LogArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    args.logging.init(&filter)?;
    let id = match args.id {
        Some(id) => id,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .context("no --id and no hostname")?,
    };
    let http: Option<SocketAddr> = if args.http.is_empty() {
        None
    } else {
        let addr = args.http.strip_prefix("http://").unwrap_or(&args.http);
        let addr = if addr.starts_with(':') {
            format!("0.0.0.0{addr}")
        } else {
            addr.to_string()
        };
        Some(addr.parse().with_context(|| format!("--http {:?}", args.http))?)
    };
    let config = ShimConfig {
        election: args.election,
        namespace: args.election_namespace,
        id,
        ttl: args.ttl,
        socket: args.socket,
    };
    config.timing()?;
    anyhow::ensure!(
        args.http_timeout.is_finite() && args.http_timeout > 0.0,
        "--http-timeout must be a positive number of seconds"
    );
    let limits = elector_broker::http::HttpLimits {
        max_connections: args.http_max_connections.max(1),
        header_timeout: Duration::from_secs_f64(args.http_timeout),
        write_timeout: Duration::from_secs_f64(args.http_timeout),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        s.cancel();
    });
    let listener = match http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        ),
        None => None,
    };
    shim::run_limited(config, listener, limits, stop).await?;
    Ok(())
}
