//! The node socket: applications talk to the broker over newline-delimited JSON on a Unix
//! domain socket (protocol v1, see `PROTOCOL.md` and [`elector_client::protocol`]).
//!
//! Guarantees:
//! - one broker per socket path: a broker owns its path by holding an exclusive `flock` on
//!   `<path>.lock` for as long as it runs, and refuses to start while another broker holds it
//!   or answers on the path ([`SocketError::InUse`]). A stale socket file with nothing behind
//!   it (a crashed broker's) is replaced;
//! - the socket appears atomically (bound under a temporary name, then renamed); an existing
//!   path is replaced only if it is a socket; on clean exit it is removed only if it is still
//!   the file this broker bound (same inode), never a successor's;
//! - a rolling upgrade is make-before-break: a successor started with `--takeover` renames
//!   its socket over the path; this broker notices, stops accepting and moves its connections
//!   there in turns ([`Limits::handoff_concurrency`]), only while the successor answers. If
//!   the successor goes away while this broker still runs (a release that crashes, a rollback
//!   that deletes the new pod), this broker takes the path back the same way and serves again,
//!   so the apps already moved resume here instead of losing their leadership; a successor
//!   that comes back takes over again ([`PathState`]);
//! - bad input gets an `error` event with a stable code and never harms the connection (unless
//!   it keeps coming), other connections, or the broker;
//! - a connection closing resigns all of its campaigns at once;
//! - a client that does not read cannot block the broker or make it grow without bound; one
//!   that pipelines requests and reads is slowed down (backpressure), never cut off;
//! - at most `max_connections` clients (clamped to the file-descriptor budget by
//!   [`crate::daemon::FdBudget`]); the others, and any client that arrives when the process is
//!   out of descriptors (`EMFILE`, via a spare descriptor), get `too_many_connections` and are
//!   closed, never left hanging; accept errors back off instead of spinning.

mod connection;
pub mod outbox;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attest::Attestor;
use crate::registry::Elections;
use elector_client::protocol::{ErrorCode, Event, RequestError};

/// How often a broker checks that its socket path is still its own, and, once superseded,
/// that its successor still answers there.
const SUPERSEDED_CHECK: Duration = Duration::from_millis(50);

/// A superseded broker takes its socket path back after its successor failed to answer this
/// many checks in a row (at least 100 ms of silence: a successor that is alive always answers,
/// if only from its listen backlog, so one refused connection already means nobody listens;
/// the margin is for a successor whose pod restarts it at once, which then takes over again).
const RECLAIM_AFTER_SILENT_CHECKS: u32 = 3;

/// Who serves the socket path, as a broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// This broker: it accepts connections there.
    Serving,
    /// A successor took the path over (`--takeover`): this broker accepts nothing, and moves
    /// its connections there in turns, only while `successor_answers`. A successor that stops
    /// answering for good is replaced: this broker takes the path back and is `Serving` again.
    Superseded { successor_answers: bool },
}

impl PathState {
    /// Whether a connection may move now: superseded, and the successor answers.
    fn may_move(self) -> bool {
        matches!(
            self,
            PathState::Superseded {
                successor_answers: true
            }
        )
    }
}

/// Limits and deadlines of the socket server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From connect to the first request.
    pub first_request_timeout: Duration,
    /// A connection with nothing campaigned or observed that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    /// Campaigns plus observations on one connection.
    pub max_elections_per_connection: usize,
    /// Events queued for one connection before it is judged stuck.
    pub outbox_limit: usize,
    /// A write to a client that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    /// Bad requests in a row before the connection is closed.
    pub max_consecutive_errors: u32,
    /// A superseded broker moves its connections to the successor a few at a time: this many
    /// at once, each turn lasting at least `handoff_turn` (by default 2 and 2 ms: at most
    /// 1,000 connections a second). Each moved leader is in jeopardy from its hand-off until
    /// the successor confirms it (a read and a write of its lock), so the successor must not
    /// get a node's worth of resumes at once: paced, each waits for its own two requests
    /// only, while the leaders not yet moved are renewed here as usual.
    pub handoff_concurrency: usize,
    pub handoff_turn: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections: 4096,
            max_connections_per_uid: 1024,
            max_elections_per_connection: 256,
            outbox_limit: 1024,
            write_timeout: Duration::from_secs(10),
            max_consecutive_errors: 16,
            handoff_concurrency: 2,
            handoff_turn: Duration::from_millis(2),
        }
    }
}

/// How the socket file is made.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    pub path: PathBuf,
    /// Permission bits of the socket file (e.g. `0o660`).
    pub mode: u32,
    /// Group that owns the socket file.
    pub group: Option<u32>,
    /// Take the path over from a running broker (a rolling upgrade): bind a fresh socket,
    /// rename it over the path, and own the path once the old broker, which notices and moves
    /// its connections here, has exited. Without it, a live broker on the path is an error.
    pub takeover: bool,
}

/// What the broker tells every connection about itself.
#[derive(Debug, Clone)]
pub struct BrokerIdentity {
    pub node: String,
    pub default_namespace: String,
}

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error(
        "{path}: another electord is serving this socket ({how}); refusing to take it over, which would cut its clients off. Stop that broker first"
    )]
    InUse { path: PathBuf, how: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A bound socket, owned: the listener, and the claim on its path.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    /// How the socket file is made (again, when this broker takes its path back).
    options: SocketOptions,
    /// (device, inode) of the socket file this broker bound.
    file: (u64, u64),
    /// Held for the broker's lifetime: the path's ownership (after a takeover, once the
    /// predecessor let go of it).
    _owner: Arc<Mutex<Option<nix::fcntl::Flock<std::fs::File>>>>,
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file at the path is still the socket this broker bound (a successor that
    /// takes over renames its own over it).
    pub fn still_mine(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file)
    }

    /// Removes the socket file if it is still the one this broker bound.
    fn remove_if_mine(&self) {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.file => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => {
                tracing::info!(path = %self.path.display(), "the socket path now belongs to another broker: leaving it")
            }
            Err(_) => {}
        }
    }
}

/// The lock file that says who owns a socket path.
pub fn owner_lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes ownership of `path`, or says who has it: `Ok(None)` when a live broker has it and
/// `takeover` allows taking it over (ownership follows when that broker exits).
fn claim(path: &Path, takeover: bool) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, SocketError> {
    use nix::fcntl::{Flock, FlockArg};
    let lock_path = owner_lock_path(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    let owner = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(owner) => owner,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) if takeover => return Ok(None),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(SocketError::InUse {
                path: path.to_path_buf(),
                how: "it holds the path's lock file",
            });
        }
        Err((_, e)) => return Err(io_err(&lock_path)(e.into())),
    };
    // A broker that predates lock files, or one whose lock file was removed: it answers.
    if std::os::unix::net::UnixStream::connect(path).is_ok() && !takeover {
        return Err(SocketError::InUse {
            path: path.to_path_buf(),
            how: "it accepts connections",
        });
    }
    Ok(Some(owner))
}

/// After a takeover: waits (on a blocking thread) for the predecessor to let go of the path's
/// lock, and keeps it.
fn own_when_free(path: &Path, slot: Arc<Mutex<Option<nix::fcntl::Flock<std::fs::File>>>>) {
    use nix::fcntl::{Flock, FlockArg};
    let lock_path = owner_lock_path(path);
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(&lock_path) else {
        return;
    };
    // A detached thread, not `spawn_blocking`: the runtime's shutdown would wait for it, so a
    // successor stopped while its predecessor still runs (a rollback) would hang on exit.
    let spawned = std::thread::Builder::new()
        .name("socket-owner".into())
        .spawn(move || match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(owner) => {
                tracing::info!(lock = %lock_path.display(), "the previous broker let go of the socket path");
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(owner);
            }
            Err((_, e)) => tracing::warn!(lock = %lock_path.display(), "cannot lock: {e}"),
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot wait for the socket path's lock: {e}");
    }
}

/// Claims `path` and binds the socket atomically: a temporary name in the same directory,
/// permissions set, then renamed over `path` (only if `path` is missing or a dead socket).
pub fn bind(opts: &SocketOptions) -> Result<BoundSocket, SocketError> {
    let path = &opts.path;
    let dir = socket_dir(path);
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_socket()) {
        return Err(SocketError::NotASocket { path: path.clone() });
    }
    let owner = claim(path, opts.takeover)?;
    if owner.is_none() {
        tracing::info!(path = %path.display(), "taking the socket over from the running broker (rolling upgrade)");
    }
    let (listener, file) = bind_over(opts)?;
    let taken_over = owner.is_none();
    let slot = Arc::new(Mutex::new(owner));
    if taken_over {
        own_when_free(path, slot.clone());
    }
    Ok(BoundSocket {
        listener,
        path: path.clone(),
        options: opts.clone(),
        file,
        _owner: slot,
    })
}

fn socket_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Binds a fresh socket under a temporary name beside `opts.path`, gives it its mode and
/// group, and renames it over the path (atomic: a client connecting meanwhile reaches either
/// the old socket or this one, never nothing). Returns the listener and the file's (device,
/// inode).
///
/// The temporary name is this call's alone (pid and a random number: brokers in different pid
/// namespaces, every container being pid 1 without `hostPID`, or in one test process, share
/// pids), and nothing found under it is removed: two brokers binding at once (a successor
/// starting while its predecessor takes the path back; two superseded brokers taking it back)
/// never delete or rename each other's socket. `bind` creates the file exclusively. The
/// directory is made if it is missing.
fn bind_over(opts: &SocketOptions) -> Result<(UnixListener, (u64, u64)), SocketError> {
    use std::os::unix::fs::MetadataExt;
    let path = &opts.path;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(SocketError::NotASocket { path: path.clone() }),
        _ => {}
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("elector.sock");
    // Made again if it went away (a cleanup of the run directory), as at start.
    let dir = socket_dir(path);
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{file_name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let listener = UnixListener::bind(&tmp).map_err(io_err(&tmp))?;
    let made = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.mode))?;
        if let Some(gid) = opts.group {
            nix::unistd::chown(&tmp, None, Some(nix::unistd::Gid::from_raw(gid)))?;
        }
        let bound = std::fs::symlink_metadata(&tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok::<_, std::io::Error>((bound.dev(), bound.ino()))
    })();
    match made {
        Ok(file) => Ok((listener, file)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io_err(path)(e))
        }
    }
}

/// Shared state of the server's connections.
#[derive(Debug)]
pub(crate) struct ServerShared {
    pub elections: Elections,
    pub limits: Limits,
    pub identity: BrokerIdentity,
    pub shutdown: CancellationToken,
    /// `Some`: callers are attested (`--attest=kubernetes`).
    pub attestor: Option<Arc<Attestor>>,
    /// Who serves the socket path. Once a successor took it over, every connection moves
    /// there in its turn ([`ServerShared::handoff_turns`]), only while the successor answers:
    /// so a successor that dies (a bad release) strands no more apps; the others stay served,
    /// and renewed, here, and this broker takes the path back if it stays silent.
    pub path_state: tokio::sync::watch::Sender<PathState>,
    /// Turns of connections moving to a successor ([`Limits::handoff_concurrency`]).
    pub handoff_turns: Arc<Semaphore>,
    /// One permit per connection (`max_connections`).
    connections: Arc<Semaphore>,
    conns_per_uid: Mutex<HashMap<u32, usize>>,
}

/// A connection's place in the server's limits: its permit among `max_connections`, its
/// count among its uid's, and its `connected_clients`; all given back when it is dropped,
/// with the connection's task.
#[derive(Debug)]
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    uid: u32,
    shared: Arc<ServerShared>,
}

impl Admission {
    /// Admits one more connection from `uid`, or says which limit it would break.
    fn new(shared: &Arc<ServerShared>, uid: u32) -> Result<Admission, String> {
        let limits = &shared.limits;
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            return Err(format!(
                "the broker has its maximum of {} connections",
                limits.max_connections
            ));
        };
        let mut per_uid = shared.conns_per_uid.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per_uid.entry(uid).or_default();
        if *mine >= limits.max_connections_per_uid {
            return Err(format!(
                "uid {uid} has its maximum of {} connections",
                limits.max_connections_per_uid
            ));
        }
        *mine += 1;
        shared.elections.metrics().connected_clients.inc();
        Ok(Admission {
            _permit: permit,
            uid,
            shared: shared.clone(),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.elections.metrics().connected_clients.dec();
        let mut per_uid = self
            .shared
            .conns_per_uid
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                per_uid.remove(&self.uid);
            }
        }
    }
}

/// A descriptor kept open (on `/dev/null`) for one purpose: when `accept` fails with `EMFILE`,
/// closing it lets the server accept the waiting client and tell it `too_many_connections`
/// instead of leaving it hanging.
#[derive(Debug)]
struct SpareFd(Option<std::fs::File>);

impl SpareFd {
    fn open() -> SpareFd {
        SpareFd(std::fs::File::open("/dev/null").ok())
    }
}

/// The socket server.
#[derive(Debug)]
pub struct SocketServer {
    socket: BoundSocket,
    shared: Arc<ServerShared>,
    tracker: TaskTracker,
}

impl SocketServer {
    pub fn new(
        socket: BoundSocket,
        elections: Elections,
        identity: BrokerIdentity,
        limits: Limits,
        shutdown: CancellationToken,
        attestor: Option<Arc<Attestor>>,
    ) -> Self {
        let limits_max = limits.max_connections;
        let handoff_concurrency = limits.handoff_concurrency.max(1);
        SocketServer {
            socket,
            shared: Arc::new(ServerShared {
                elections,
                limits,
                identity,
                shutdown,
                attestor,
                path_state: tokio::sync::watch::Sender::new(PathState::Serving),
                handoff_turns: Arc::new(Semaphore::new(handoff_concurrency)),
                connections: Arc::new(Semaphore::new(limits_max)),
                conns_per_uid: Mutex::new(HashMap::new()),
            }),
            tracker: TaskTracker::new(),
        }
    }

    /// Who serves the socket path: [`PathState::Superseded`] once a successor took it over
    /// (a rolling upgrade), and [`PathState::Serving`] again if this broker takes it back.
    pub fn path_state(&self) -> tokio::sync::watch::Receiver<PathState> {
        self.shared.path_state.subscribe()
    }

    /// Serves the socket until the shutdown token fires, then waits for the connections to
    /// finish (they flush `lost`/`broker_shutdown` events first) and removes the socket file
    /// if it is still this broker's.
    ///
    /// When a successor takes the path over, this broker accepts nobody new (nobody can reach
    /// its socket any more) and moves every connection there: each, in its turn, hands its
    /// leaders off (`jeopardy`, nothing written), is told `reconnect` and is closed, while
    /// those still waiting for their turn are served as usual. Then it idles. If the
    /// successor stops answering on the path (it died, or was stopped while this broker still
    /// runs), connections stop moving, and this broker binds a fresh socket, renames it over
    /// the path and serves again: the apps it moved reconnect and resume here.
    pub async fn run(self) {
        let SocketServer {
            mut socket,
            shared,
            tracker,
        } = self;
        let mut spare = SpareFd::open();
        loop {
            if serve(&socket, &shared, &tracker, &mut spare).await == Era::Stopped {
                break;
            }
            // Asked before any connection may move: the path may have changed without a
            // successor behind it (the file removed, a successor that died at once).
            let successor_answers = successor_answers(&socket.path).await;
            if successor_answers {
                tracing::info!(path = %socket.path.display(), "a successor broker took the socket over: moving every connection to it");
            } else {
                tracing::warn!(path = %socket.path.display(), "the socket path changed and nobody answers there (the file was removed or replaced, or a successor died at once): connections stay; taking the path back");
            }
            shared
                .path_state
                .send_replace(PathState::Superseded { successor_answers });
            shared.elections.metrics().socket_superseded.set(1);
            let era = follow_successor(&mut socket, &shared, &tracker, &mut spare).await;
            if era == Era::Stopped {
                break;
            }
            shared.path_state.send_replace(PathState::Serving);
            shared.elections.metrics().socket_superseded.set(0);
        }
        socket.remove_if_mine();
        let BoundSocket { listener, _owner, .. } = socket;
        drop(listener);
        tracker.close();
        tracker.wait().await;
        // The claim on the path goes last, with the connections.
        drop(_owner);
    }
}

/// How a phase of the socket server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Era {
    /// The broker is stopping.
    Stopped,
    /// Serving ended: a successor took the path over.
    Superseded,
    /// Following a successor ended: this broker took the path back.
    ServingAgain,
}

/// Accepts connections while the path is this broker's: until the shutdown, or until a
/// successor takes the path over.
async fn serve(
    socket: &BoundSocket,
    shared: &Arc<ServerShared>,
    tracker: &TaskTracker,
    spare: &mut SpareFd,
) -> Era {
    let mut backoff = Duration::ZERO;
    let mut check = tokio::time::interval(SUPERSEDED_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Era::Stopped,
            _ = check.tick() => {
                if !socket.still_mine() {
                    return Era::Superseded;
                }
            }
            accepted = socket.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    accept(shared, tracker, stream);
                }
                Err(e) => {
                    let out_of_fds = matches!(
                        nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                        nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE
                    );
                    if out_of_fds && refuse_with_spare(&socket.listener, shared, spare).await {
                        continue;
                    }
                    // Out of file descriptors and the like: back off instead of spinning.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
            },
        }
    }
}

/// While a successor serves the path: keeps [`PathState::Superseded`] up to date (whether the
/// successor answers), serves the clients still in the old socket's backlog (they move in
/// their turn like everyone else), notes when every connection has moved, and takes the path
/// back when the successor stays silent ([`RECLAIM_AFTER_SILENT_CHECKS`]).
async fn follow_successor(
    socket: &mut BoundSocket,
    shared: &Arc<ServerShared>,
    tracker: &TaskTracker,
    spare: &mut SpareFd,
) -> Era {
    let path = socket.path.clone();
    let mut check = tokio::time::interval(SUPERSEDED_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silent_checks = 0u32;
    // Failed attempts to take the path back: each doubles the silence the next one waits for.
    let mut reclaim_failures = 0u32;
    let mut all_moved = false;
    tracker.close();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Era::Stopped,
            _ = tracker.wait(), if !all_moved => {
                all_moved = true;
                tracing::info!(path = %path.display(), "every connection moved to the successor; idling until stopped (the socket path is taken back if the successor goes away)");
            }
            accepted = socket.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    all_moved = false;
                    accept(shared, tracker, stream);
                }
                Err(e) => {
                    if !refuse_with_spare(&socket.listener, shared, spare).await {
                        tracing::debug!("accept failed while superseded: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
            _ = check.tick() => {
                let answers = successor_answers(&path).await;
                shared.path_state.send_if_modified(|state| {
                    let now = PathState::Superseded { successor_answers: answers };
                    if *state == now {
                        return false;
                    }
                    if answers {
                        tracing::info!(path = %path.display(), "the successor answers again: moving connections to it");
                    } else {
                        tracing::warn!(path = %path.display(), "the successor does not answer on the socket: connections not yet moved stay here");
                    }
                    *state = now;
                    true
                });
                silent_checks = if answers { 0 } else { silent_checks + 1 };
                if answers {
                    // Failures to take the path back belong to its past: from a successor
                    // that answered, the path is taken back as promptly as from any.
                    reclaim_failures = 0;
                }
                if silent_checks >= RECLAIM_AFTER_SILENT_CHECKS << reclaim_failures.min(8) {
                    match bind_over(&socket.options) {
                        Ok((listener, file)) => {
                            socket.listener = listener;
                            socket.file = file;
                            tracker.reopen();
                            shared.elections.metrics().socket_reclaims.inc();
                            tracing::warn!(path = %path.display(), "the successor went away: took the socket path back and serving again (the apps moved to it resume here)");
                            return Era::ServingAgain;
                        }
                        Err(e) => {
                            silent_checks = 0;
                            reclaim_failures += 1;
                            tracing::warn!(path = %path.display(), "the successor went away, and the socket path cannot be taken back: {e}");
                        }
                    }
                }
            }
        }
    }
}

/// Out of descriptors: frees the spare one to accept a waiting client and tell it
/// `too_many_connections`, then takes the spare back. False if that did not work either.
async fn refuse_with_spare(listener: &UnixListener, shared: &ServerShared, spare: &mut SpareFd) -> bool {
    if spare.0.take().is_none() {
        *spare = SpareFd::open();
        return false;
    }
    let refused = match tokio::time::timeout(Duration::from_millis(10), listener.accept()).await {
        Ok(Ok((stream, _))) => {
            let metrics = shared.elections.metrics();
            metrics.rejected(ErrorCode::TooManyConnections.as_str());
            let line = RequestError::new(
                None,
                ErrorCode::TooManyConnections,
                "the broker is out of file descriptors; retry later",
            )
            .into_event()
            .to_line();
            // A fresh socket's buffer is empty: the line fits without waiting.
            let _ = stream.try_write(&line);
            true
        }
        _ => false,
    };
    *spare = SpareFd::open();
    if refused {
        tracing::warn!("out of file descriptors: refused a client with too_many_connections");
    }
    refused
}

/// Serves an accepted connection, or tells it which limit it would break.
fn accept(shared: &Arc<ServerShared>, tracker: &TaskTracker, stream: UnixStream) {
    let cred = stream.peer_cred().ok();
    let uid = cred.map(|c| c.uid()).unwrap_or(u32::MAX);
    let pid = cred.and_then(|c| c.pid());
    match Admission::new(shared, uid) {
        Err(message) => {
            shared
                .elections
                .metrics()
                .rejected(ErrorCode::TooManyConnections.as_str());
            tracker.spawn(async move {
                let line = RequestError::new(None, ErrorCode::TooManyConnections, message).into_event();
                let _ = tokio::time::timeout(Duration::from_secs(1), write_line(stream, line)).await;
            });
        }
        Ok(admission) => {
            tracker.spawn(connection::serve(stream, pid, shared.clone(), admission));
        }
    }
}

/// Whether a broker accepts connections on `path`: refused or missing means nobody listens (a
/// full backlog, or a slow accept, still counts as answering).
async fn successor_answers(path: &Path) -> bool {
    match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await {
        Ok(Ok(_)) | Err(_) => true,
        Ok(Err(e)) => !matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        ),
    }
}

async fn write_line(mut stream: UnixStream, event: Event) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.write_all(&event.to_line()).await;
    let _ = stream.shutdown().await;
}
