//! `elector`: run any program only while it leads, and watch and inspect elections, through the
//! node's elector broker (`electord`).
//!
//! Exit codes are listed in [`exit`] and in `elector --help`.

mod child;
mod exit;
mod run;
mod session;
mod signals;
mod status;
mod watch;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use elector_client::protocol::{DEFAULT_SOCKET_PATH, LockKind};

const EXIT_CODES: &str = "\
Exit codes:
  0    done (or stopped by SIGTERM/SIGINT while no CMD ran)
  1    the broker refused a request (invalid name, forbidden namespace, ...) or another error
  2    bad command line
  3    `leader`: nobody leads
  4    `leader`: who leads is unknown (the broker cannot read the lock, or did not answer)
  69   the broker could not be reached at --socket, or the connection to it was lost
  75   `run --once`: leadership was lost and CMD was stopped
  126  `run`: CMD could not be executed;  127: CMD was not found
  other `run`: CMD's own exit code (128+N when a signal N ended it)";

/// Leader election for Kubernetes apps, through the node's elector broker.
#[derive(Debug, Parser)]
#[command(
    name = "elector",
    version,
    about,
    after_help = EXIT_CODES,
    after_long_help = EXIT_CODES
)]
struct Cli {
    /// The broker's Unix socket.
    #[arg(long, global = true, env = "ELECTOR_SOCKET", default_value = DEFAULT_SOCKET_PATH)]
    socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run CMD only while this instance leads the election (like `consul lock`).
    #[command(
        long_about = "Campaigns in the election and starts CMD once elected. When leadership is \
lost (the broker says `lost`, or the connection to it breaks), CMD's process group gets SIGTERM, \
then SIGKILL after --grace. SIGTERM, SIGINT and SIGHUP are forwarded to CMD (which is then stopped, with --grace). When CMD exits by itself, \
elector resigns at once (another instance takes over within milliseconds) and campaigns again, \
unless --once. If elector itself is killed (even with SIGKILL), a guard process started beside \
CMD kills CMD's process group at once. CMD gets ELECTOR_TERM (the lock's term: a fencing token that only grows), \
ELECTOR_ELECTION, ELECTOR_NAMESPACE and ELECTOR_IDENTITY in its environment.\n\n\
Choose --grace shorter than the broker's lease duration minus its renew deadline (15 s - 10 s \
by default) so that CMD is stopped before another node can take over.",
        after_help = "Examples:
  # a cron-style shell loop that must run on one pod at a time
  elector run --election nightly-report -- sh -c 'while :; do ./report.sh; sleep 3600; done'

  # a server that only the leader runs, stopped within 5 s of losing leadership
  elector run --election billing-sync --grace 5s -- /usr/local/bin/sync --fence \"$ELECTOR_TERM\""
    )]
    Run(RunArgs),

    /// Print every leader change of an election, one line each, until interrupted.
    #[command(after_help = "Examples:
  elector observe nightly-report
  elector observe nightly-report --namespace batch --json | jq .leader")]
    Observe(ObserveArgs),

    /// Print who leads an election now, and exit (3 when nobody does).
    #[command(after_help = "Examples:
  elector leader nightly-report            # prints the holder's identity
  if [ \"$(elector leader web)\" = \"$HOSTNAME\" ]; then echo 'I lead'; fi")]
    Leader(LeaderArgs),

    /// Campaign in an election and print its events until interrupted, then resign.
    #[command(after_help = "Examples:
  elector campaign nightly-report --identity debug-1
  elector campaign nightly-report --json")]
    Campaign(CampaignArgs),

    /// Show this node's elections: leaders, terms, local candidates (from the broker's /elections).
    #[command(
        long_about = "Shows every election the node's broker runs: its leader and term, whether this \
broker holds the lock, the local candidates (* marks the leader) and how many observers. It reads \
the broker's HTTP endpoint /elections (electord --http-addr), which covers the whole node; the \
socket's `status` op only describes one connection's own campaigns. In a cluster: \
`kubectl exec -n elector-system ds/electord -- elector status`.",
        after_help = "Examples:
  elector status
  elector status --http-addr 10.0.3.7:4041 --json | jq '.[] | select(.leader == null)'"
    )]
    Status(StatusArgs),

    /// Internal: kills process group GROUP when stdin closes without a word (`elector run`
    /// starts one beside each CMD; see cli/src/child.rs).
    #[command(name = child::GUARD_COMMAND, hide = true)]
    Guard { group: i32 },
}

/// Which election.
#[derive(Debug, Args)]
struct ElectionArgs {
    /// Namespace of the lock object (default: the broker's, or this pod's with attestation).
    #[arg(long, short = 'n')]
    namespace: Option<String>,

    /// The kind of lock object.
    #[arg(long, value_enum, default_value_t = Lock::Lease)]
    lock: Lock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Lock {
    Lease,
    Endpoints,
}

impl From<Lock> for LockKind {
    fn from(l: Lock) -> LockKind {
        match l {
            Lock::Lease => LockKind::Lease,
            Lock::Endpoints => LockKind::Endpoints,
        }
    }
}

/// Who campaigns.
#[derive(Debug, Args)]
struct CandidateArgs {
    /// Holder identity written into the lock (default: $POD_NAME, else the hostname, which in
    /// Kubernetes is the pod's name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Among this node's candidates, higher is chosen first at the next handover (never
    /// preempts a live leader).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
}

impl CandidateArgs {
    fn identity(&self) -> anyhow::Result<String> {
        if let Some(id) = &self.identity {
            return Ok(id.clone());
        }
        let host = nix::unistd::gethostname()
            .map_err(|e| anyhow::anyhow!("no --identity given and the hostname cannot be read: {e}"))?;
        host.into_string()
            .map_err(|h| anyhow::anyhow!("no --identity given and the hostname {h:?} is not UTF-8"))
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The election (the lock object's name).
    #[arg(long, short = 'e')]
    election: String,

    #[command(flatten)]
    target: ElectionArgs,

    #[command(flatten)]
    candidate: CandidateArgs,

    /// How long CMD has to exit after SIGTERM before it gets SIGKILL (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,

    /// Run CMD at most once: exit when it exits (with its code), or when leadership is lost (75).
    #[arg(long, conflicts_with = "restart_on_lead")]
    once: bool,

    /// When CMD exits by itself while this instance still leads, start it again at once and keep
    /// the leadership (default: resign, so another instance may take over, then campaign again).
    #[arg(long)]
    restart_on_lead: bool,

    /// The command to run while leading, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
struct ObserveArgs {
    /// The election (the lock object's name).
    election: String,

    #[command(flatten)]
    target: ElectionArgs,

    /// Print the broker's events as JSON lines (the socket protocol's format).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LeaderArgs {
    /// The election (the lock object's name).
    election: String,

    #[command(flatten)]
    target: ElectionArgs,

    /// Print the broker's `leader` event as JSON.
    #[arg(long)]
    json: bool,

    /// How long to wait for the broker to know who leads.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct CampaignArgs {
    /// The election (the lock object's name).
    election: String,

    #[command(flatten)]
    target: ElectionArgs,

    #[command(flatten)]
    candidate: CandidateArgs,

    /// Print the broker's events as JSON lines (the socket protocol's format).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The broker's HTTP address (electord --http-addr).
    #[arg(long, env = "ELECTOR_HTTP_ADDR", default_value = "127.0.0.1:4041")]
    http_addr: String,

    /// Print the broker's /elections JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 10s, 500ms, 2m)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Guard { group } = cli.command {
        // No runtime: the guard only blocks in `read`, and with no other thread a signal it
        // blocks can never be delivered elsewhere; nor does it hold any socket.
        return ExitCode::from(child::guard(group));
    }
    // One thread: `run` starts CMD from it, and nothing here needs more.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("elector: cannot start: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let socket = cli.socket.clone();
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(&socket, args).await,
            Command::Observe(args) => watch::observe(&socket, args).await,
            Command::Leader(args) => watch::leader(&socket, args).await,
            Command::Campaign(args) => watch::campaign(&socket, args).await,
            Command::Status(args) => status::status(args).await,
            // Handled above, without a runtime.
            Command::Guard { group } => Ok(child::guard(group)),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("elector: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}
