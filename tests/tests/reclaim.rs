//! A superseded broker takes its socket path back when its successor goes away, under attack:
//! the shipped `electord` binary, a fake successor (a socket the test renames over the path
//! and closes: a successor that crashes), real successors killed again and again, and paths
//! that are not sockets. What these tests hold it to:
//! - a reclaim never touches a file another broker is binding: two brokers with the same pid
//!   (every container is pid 1 in its own pid namespace without `hostPID`; the in-process
//!   test brokers share one pid) must not pick the same temporary name;
//! - a successor that crash-loops costs no leadership while the old broker lives, and the old
//!   broker's descriptors and connections do not grow with the cycles;
//! - a chained upgrade whose last broker dies converges on one serving broker, with every
//!   leader in its term;
//! - SIGTERM at any moment around a reclaim stops the old broker promptly and leaves nothing
//!   behind in the socket directory;
//! - a path that turned into a regular file or a directory is never replaced, and the failed
//!   attempts back off instead of spamming the log; the broker serves again once the path is
//!   free;
//! - a successor stopped (SIGTERM) in the middle of the move: the leaders it took resume at
//!   the old broker, and those not yet moved are never disturbed;
//! - a socket file or directory removed from under a serving broker moves nobody, and the
//!   broker serves its path again.
//!
//! Each of these found a gap once, now fixed (broker/src/socket/mod.rs): a reclaim removed and
//! renamed another same-pid broker's temporary socket; a broker whose socket file was removed
//! let a few connections move (`jeopardy`, `reconnect`) before it asked whether anyone answered;
//! failed reclaims inflated the wait before taking the path back from a later successor; a
//! removed socket directory was never made again.

use elector_tests::upgrade::{
    Journal, campaign, holder_and_term, lease, open_when_up, two_leader_oracle, wait_until,
};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use elector_client::{Campaign, CampaignEvent, Client};
use elector_tests::harness::{Backend, TestBroker, fast_timing};
use elector_tests::kube_api::{Rule, TestApiServer, User};
use serde_json::json;
use tokio::time::Instant;

/// A real `electord` process, with its HTTP address (for `/metrics`) and its log file.
struct Electord {
    child: tokio::process::Child,
    http: SocketAddr,
    /// Its standard error (removed with it).
    log: tempfile::NamedTempFile,
}

impl Electord {
    fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
    }

    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    /// Waits (at most 15 s) for the process to exit; its exit status.
    async fn exited(&mut self) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// A metric from `/metrics` (by name prefix: a counter ends in `_total`); `None` when the
    /// broker does not answer.
    async fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = elector_tests::http_get(self.http, "/metrics").await.ok()?;
        assert_eq!(status, 200);
        body.lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with("_total "))
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Open descriptors of the process.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc/<pid>/fd")
            .count()
    }
}

/// A free local TCP port for a broker's HTTP server.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A real `electord` of node `node` acting as kube user `user` on `socket` (lease 15 s, renew
/// deadline 10 s, retry 2 s), its standard error kept in a temporary file, with `extra` flags.
fn electord(server: &TestApiServer, user: &User, node: &str, socket: &Path, extra: &[&str]) -> Electord {
    let http = free_addr();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = tokio::process::Command::new(elector_tests::workspace_bin("elector-broker", "electord"))
        .arg("--kubeconfig")
        .arg(server.kubeconfig_path(user))
        .args(["--node-name", node, "--attest=none"])
        .arg(format!("--http-addr={http}"))
        .args([
            "--lease-duration",
            "15",
            "--renew-deadline",
            "10",
            "--retry-period",
            "2",
        ])
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("electord starts");
    Electord { child, http, log }
}

/// Waits until `metric` of `broker` is `value`.
async fn metric_becomes(broker: &Electord, metric: &str, value: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let now = broker.metric(metric).await;
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{metric} is {now:?}, not {value}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fake successor: a socket bound beside `socket` and renamed over it, as a successor
/// started with `--takeover` does. Closing it is the successor's crash (its file stays).
fn fake_successor(socket: &Path) -> std::os::unix::net::UnixListener {
    let tmp = socket.with_file_name(".fake-successor.tmp");
    let _ = std::fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp).unwrap();
    std::fs::rename(&tmp, socket).unwrap();
    l
}

fn inode(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Leaders (Rust clients, which reconnect and resume by themselves) on a node's socket, each
/// on its own connection, with a standby for each election on another node's broker, and the
/// two-leader oracle watching them all.
struct Leaders {
    journal: Journal,
    leaders: Vec<Campaign>,
    standbys: Vec<Campaign>,
    clients: Vec<Client>,
    oracle: (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, Vec<String>)>),
    terms: Vec<(String, i32)>,
    prefix: String,
}

impl Leaders {
    async fn start(
        server: &TestApiServer,
        socket: &Path,
        other: &TestBroker,
        prefix: &str,
        n: usize,
    ) -> Leaders {
        let journal: Journal = Default::default();
        let mut clients = Vec::new();
        let mut leaders = Vec::new();
        for i in 0..n {
            let client = Client::connect(socket).await.unwrap();
            let c = campaign(&client, &format!("{prefix}-{i}"), &format!("app-{i}"), &journal).await;
            wait_until("elected", Duration::from_secs(20), || c.is_leader()).await;
            leaders.push(c);
            clients.push(client);
        }
        let b = Client::connect(&other.socket).await.unwrap();
        let mut standbys = Vec::new();
        for i in 0..n {
            standbys.push(campaign(&b, &format!("{prefix}-{i}"), &format!("sb-{i}"), &journal).await);
        }
        clients.push(b);
        let watched = leaders
            .iter()
            .chain(standbys.iter())
            .map(|c| {
                let election = format!("{prefix}-{}", c.identity().rsplit('-').next().unwrap());
                (election, c.identity().to_string(), c.state())
            })
            .collect();
        let oracle = two_leader_oracle(watched);
        let mut terms = Vec::new();
        for i in 0..n {
            terms.push(holder_and_term(&lease(server, &format!("{prefix}-{i}")).await));
        }
        Leaders {
            journal,
            leaders,
            standbys,
            clients,
            oracle,
            terms,
            prefix: prefix.into(),
        }
    }

    /// Every leader leads, connected, not in jeopardy.
    fn settled(&self) -> bool {
        self.leaders.iter().all(|l| {
            let s = l.state().borrow().clone();
            s.is_leader && !s.jeopardy && s.connected
        })
    }

    async fn until_settled(&self, what: &str) {
        wait_until(what, Duration::from_secs(30), || self.settled()).await;
    }

    fn safe_count(&self) -> usize {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, w, e)| w.starts_with("app-") && matches!(e, CampaignEvent::Safe { .. }))
            .count()
    }

    /// Stops the oracle and checks: never two leaders; every app elected once (at the start)
    /// and never told `lost`; no standby elected; every Lease in its first holder and term.
    async fn check(self, server: &TestApiServer) {
        self.oracle.0.store(true, Ordering::Relaxed);
        let (samples, violations) = self.oracle.1.await.unwrap();
        assert!(samples > 0);
        assert!(violations.is_empty(), "two leaders: {violations:?}");
        let changes: Vec<_> = self
            .journal
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, w, e)| {
                w.starts_with("app-")
                    && matches!(e, CampaignEvent::Lost { .. } | CampaignEvent::Elected { .. })
                    || w.starts_with("sb-") && matches!(e, CampaignEvent::Elected { .. })
            })
            .map(|(_, w, e)| format!("{w}: {e:?}"))
            .collect();
        assert_eq!(
            changes.len(),
            self.leaders.len(),
            "leadership changes beyond the first elections: {changes:#?}"
        );
        for (i, was) in self.terms.iter().enumerate() {
            assert_eq!(
                &holder_and_term(&lease(server, &format!("{}-{i}", self.prefix)).await),
                was,
                "{}-{i}: same holder, same term",
                self.prefix
            );
        }
        for c in &self.leaders {
            assert!(c.is_leader(), "{} leads at the end", c.identity());
        }
        drop((self.leaders, self.standbys, self.clients));
    }
}

/// Another broker binding its socket at the moment this one takes its path back, under the
/// same pid: every `electord` container is pid 1 in its own pid namespace unless the pod
/// shares the host's (`hostPID`, which only `--attest=kubernetes` needs), and the in-process
/// test brokers all share one pid. The reclaim must not touch the other broker's temporary
/// socket: here the test plays that broker (bound under the name the old broker's pid gives,
/// about to rename it over the path).
///
/// The fault this guards: `bind_over` (broker/src/socket/mod.rs) named its temporary socket
/// `.<name>.<pid>.tmp` and removed whatever had that name before binding. Two brokers of the
/// same pid binding at once (a successor restarted while the old broker reclaims; two
/// superseded brokers reclaiming after the last of a chain died) then deleted each other's
/// socket: one failed to start, or, in the worse interleaving, one renamed the other's socket
/// over the path and recorded its inode as its own, so it believed it served the path while
/// the path led to a closed socket: every app on the node refused until another takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_never_touches_the_temporary_socket_of_another_broker_of_the_same_pid() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let user = server.add_user("tmp-old", vec![Rule::all()]);
    let old = electord(&server, &user, "ntmp", &socket, &["--on-shutdown=handoff"]);
    drop(open_when_up(&socket).await);
    let successor = fake_successor(&socket);
    metric_becomes(&old, "elector_socket_superseded", 1.0, Duration::from_secs(20)).await;
    // The other broker of the same pid, between its bind and its rename.
    let other_tmp = dir.path().join(format!(".elector.sock.{}.tmp", old.pid()));
    let other = std::os::unix::net::UnixListener::bind(&other_tmp).unwrap();
    let other_file = inode(&other_tmp);
    // The successor dies: the old broker takes the path back.
    drop(successor);
    metric_becomes(&old, "elector_socket_reclaims", 1.0, Duration::from_secs(20)).await;
    drop(open_when_up(&socket).await);
    assert_eq!(
        inode(&other_tmp),
        other_file,
        "the reclaim removed (or replaced) the socket another broker was binding"
    );
    // The other broker completes its takeover: the old broker follows it.
    std::fs::rename(&other_tmp, &socket).expect("the other broker renames its socket over the path");
    metric_becomes(&old, "elector_socket_superseded", 1.0, Duration::from_secs(20)).await;
    drop(other);
    metric_becomes(&old, "elector_socket_reclaims", 2.0, Duration::from_secs(20)).await;
    drop(open_when_up(&socket).await);
}

/// A successor that crash-loops: it starts, takes the socket over, and is killed (SIGKILL)
/// at once, or after some leaders moved to it, or after all did, again and again. The old
/// broker lives throughout: its leaders (Rust clients: they reconnect and resume by themselves)
/// are never lost, never two leaders (standbys on another node), every Lease keeps its holder
/// and term; and the old broker's open descriptors and `connected_clients` do not grow with
/// the cycles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_successor_costs_no_leader_and_leaks_nothing_in_the_old_broker() {
    const APPS: usize = 3;
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let users: Vec<User> = ["cl-old", "cl-new", "cl-other"]
        .iter()
        .map(|u| server.add_user(u, vec![Rule::all()]))
        .collect();
    let old = electord(&server, &users[0], "ncl", &socket, &["--on-shutdown=handoff"]);
    drop(open_when_up(&socket).await);
    let other = TestBroker::start_configured(
        "ncl-b",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&users[2])),
        fast_timing(),
        true,
        None,
        |_| {},
    );
    let leaders = Leaders::start(&server, &socket, &other, "cl", APPS).await;
    // Killed after these delays from its start (the last: once every leader resumed at it).
    let delays = [
        0,
        0,
        150,
        400,
        800,
        1500,
        u64::MAX,
        0,
        300,
        u64::MAX,
        0,
        50,
        100,
        200,
        600,
        u64::MAX,
        0,
        250,
        1000,
        u64::MAX,
    ];
    let mut baseline = None;
    for (cycle, delay) in delays.into_iter().enumerate() {
        let reclaims = old.metric("elector_socket_reclaims").await.unwrap_or(0.0);
        let safe_before = leaders.safe_count();
        let path_before = inode(&socket);
        let mut new = electord(
            &server,
            &users[1],
            "ncl",
            &socket,
            &["--takeover", "--on-shutdown=handoff"],
        );
        wait_until(
            "the successor took the path over",
            Duration::from_secs(30),
            || inode(&socket) != path_before,
        )
        .await;
        if delay == u64::MAX {
            wait_until(
                "every leader resumed at the successor",
                Duration::from_secs(30),
                || leaders.safe_count() >= safe_before + APPS,
            )
            .await;
            // The old broker asks the successor whether it answers (a connection every 50 ms):
            // those connections end at once there, and cost it nothing that lasts.
            metric_becomes(
                &new,
                "elector_connected_clients",
                APPS as f64,
                Duration::from_secs(20),
            )
            .await;
            let fds_before = new.fds();
            let mut most = 0.0f64;
            for _ in 0..20 {
                most = most.max(new.metric("elector_connected_clients").await.unwrap_or(0.0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(most <= (APPS + 1) as f64, "the successor had {most} connections");
            assert!(
                new.fds() <= fds_before + 2,
                "the successor's descriptors grew from {fds_before} to {}",
                new.fds()
            );
        } else {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        new.kill().await;
        metric_becomes(
            &old,
            "elector_socket_reclaims",
            reclaims + 1.0,
            Duration::from_secs(20),
        )
        .await;
        leaders
            .until_settled(&format!("cycle {cycle}: every leader safe at the old broker"))
            .await;
        metric_becomes(
            &old,
            "elector_connected_clients",
            APPS as f64,
            Duration::from_secs(20),
        )
        .await;
        // The first cycle sets up what lasts (e.g. the kube client's connections).
        if cycle == 1 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            baseline = Some(old.fds());
        }
    }
    let baseline = baseline.unwrap();
    // Descriptors may come and go with the kube client's connection pool: some slack, far
    // below one per cycle (18 cycles after the baseline).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = old.fds();
    assert!(
        fds <= baseline + 8,
        "the old broker's descriptors grew from {baseline} to {fds} over {} cycles",
        delays.len() - 2
    );
    assert_eq!(old.metric("elector_socket_superseded").await, Some(0.0));
    // A fresh app is served by the old broker.
    let mut fresh = open_when_up(&socket).await;
    fresh
        .send(json!({"op":"campaign","election":"cl-fresh","identity":"fresh"}))
        .await;
    fresh.until("elected").await;
    leaders.check(&server).await;
    drop(other);
}

/// A chained upgrade (A, then B, then C take the socket over) whose last broker dies
/// (SIGKILL) once every leader moved to it: A and B, both superseded and both alive, both see
/// the path go silent. They must converge on one serving broker (whichever took the path back
/// last; the other follows it), the path must then stay put (no ping-pong), every leader
/// resumes there in its term, and the broker that does not serve is left with no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_whose_last_broker_dies_converges_on_one_serving_broker() {
    const APPS: usize = 3;
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let users: Vec<User> = ["ch-a", "ch-b", "ch-c", "ch-other"]
        .iter()
        .map(|u| server.add_user(u, vec![Rule::all()]))
        .collect();
    let a = electord(&server, &users[0], "nch", &socket, &["--on-shutdown=handoff"]);
    drop(open_when_up(&socket).await);
    let other = TestBroker::start_configured(
        "nch-b",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&users[3])),
        fast_timing(),
        true,
        None,
        |_| {},
    );
    let leaders = Leaders::start(&server, &socket, &other, "ch", APPS).await;
    let to = ["--takeover", "--on-shutdown=handoff"];
    let b = electord(&server, &users[1], "nch", &socket, &to);
    wait_until("every leader resumed at B", Duration::from_secs(30), || {
        leaders.safe_count() >= APPS
    })
    .await;
    let mut c = electord(&server, &users[2], "nch", &socket, &to);
    wait_until("every leader resumed at C", Duration::from_secs(30), || {
        leaders.safe_count() >= 2 * APPS
    })
    .await;
    metric_becomes(&b, "elector_socket_superseded", 1.0, Duration::from_secs(20)).await;
    c.kill().await;
    leaders
        .until_settled("every leader safe again after C died")
        .await;
    // Settled: one serves, the other follows it with nothing left.
    let deadline = Instant::now() + Duration::from_secs(30);
    let serving = loop {
        let (sa, sb) = (
            a.metric("elector_socket_superseded").await,
            b.metric("elector_socket_superseded").await,
        );
        let (ca, cb) = (
            a.metric("elector_connected_clients").await,
            b.metric("elector_connected_clients").await,
        );
        let settled = leaders.settled();
        match (sa, sb, ca, cb) {
            (Some(0.0), Some(1.0), Some(n), Some(0.0)) if settled && n == APPS as f64 => break "A",
            (Some(1.0), Some(0.0), Some(0.0), Some(n)) if settled && n == APPS as f64 => break "B",
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "not converged: superseded A {sa:?} B {sb:?}, connected A {ca:?} B {cb:?}, leaders settled {settled}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let path = inode(&socket);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(inode(&socket), path, "{serving} serves, and the path stays put");
    assert!(leaders.settled());
    leaders.check(&server).await;
    drop((a, b, other));
}

/// SIGTERM to the old broker at every moment around a reclaim (before, during and after the
/// three silent checks, right after the path is taken back). Each time it exits promptly and
/// cleanly, its leader is handed off (`jeopardy`, never `lost`, `--on-shutdown=handoff`), and
/// it leaves nothing behind: no temporary socket, and the path is either the dead successor's
/// file (not yet taken back) or gone (taken back, then removed on exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_around_a_reclaim_stops_the_old_broker_promptly_and_cleanly() {
    let server = TestApiServer::start().await.unwrap();
    let user = server.add_user("st-old", vec![Rule::all()]);
    for (round, delay_ms) in [0u64, 40, 90, 120, 150, 170, 200, 260, 400]
        .into_iter()
        .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("elector.sock");
        let mut old = electord(&server, &user, "nst", &socket, &["--on-shutdown=handoff"]);
        let mut app = open_when_up(&socket).await;
        app.send(json!({"op":"campaign","election":format!("st-{round}"),"identity":"app"}))
            .await;
        let elected = app.until("elected").await;
        let successor = fake_successor(&socket);
        let successor_file = inode(&socket);
        metric_becomes(&old, "elector_socket_superseded", 1.0, Duration::from_secs(20)).await;
        // The app is moved to the fake successor: jeopardy, reconnect.
        let jeopardy = app.until("jeopardy").await;
        assert_eq!(jeopardy["term"], elected["term"]);
        assert_eq!(app.until("reconnect").await["reason"], "superseded");
        drop(successor);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        old.sigterm();
        let status = old.exited().await;
        assert!(
            status.is_some_and(|s| s.success()),
            "round {round} ({delay_ms} ms): exited {status:?}; log:\n{}",
            old.log()
        );
        let now = inode(&socket);
        assert!(
            now.is_none() || now == successor_file,
            "round {round} ({delay_ms} ms): the old broker left its socket on the path"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "round {round}: left behind {left:?}");
        let log = old.log();
        assert!(!log.contains("panicked"), "round {round}: {log}");
    }
}

/// A path that stops being a socket while the broker is superseded: the dead successor's
/// socket replaced by a regular file, then by a directory. The broker never replaces either;
/// its failed attempts back off (a handful of warnings, not one per 150 ms); and once the path
/// is free again it takes it back and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_a_socket_is_never_replaced_and_the_attempts_back_off() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let user = server.add_user("ns-old", vec![Rule::all()]);
    let old = electord(&server, &user, "nns", &socket, &["--on-shutdown=handoff"]);
    drop(open_when_up(&socket).await);
    let successor = fake_successor(&socket);
    metric_becomes(&old, "elector_socket_superseded", 1.0, Duration::from_secs(20)).await;
    drop(successor);
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, b"not a socket").unwrap();
    let warnings_before = old.log().matches("cannot be taken back").count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        std::fs::read(&socket).unwrap(),
        b"not a socket",
        "the regular file is kept"
    );
    let warnings = old.log().matches("cannot be taken back").count() - warnings_before;
    assert!(
        (1..=8).contains(&warnings),
        "{warnings} failed attempts logged in 4 s: {}",
        old.log()
    );
    std::fs::remove_file(&socket).unwrap();
    std::fs::create_dir(&socket).unwrap();
    std::fs::write(socket.join("keep"), b"x").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(socket.join("keep").exists(), "the directory is kept");
    assert_eq!(old.metric("elector_socket_reclaims").await, Some(0.0));
    std::fs::remove_dir_all(&socket).unwrap();
    // The backoff is bounded (at most 768 checks, 38 s).
    tokio::time::timeout(Duration::from_secs(60), open_when_up(&socket))
        .await
        .expect("the broker takes the free path back");
    assert_eq!(old.metric("elector_socket_superseded").await, Some(0.0));
}

/// A successor stopped (SIGTERM, `--on-shutdown=handoff`: a rollback during the surge) while
/// the old broker is still moving its connections (one per 6 s turn). The leader it took
/// resumes at the old broker, which takes the path back; the leaders not yet moved are never
/// told anything (no `jeopardy`, no `reconnect`) and stay served there; nobody loses, nothing
/// changes term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_stopped_in_the_middle_of_the_move_leaves_the_rest_undisturbed() {
    const APPS: usize = 3;
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let users: Vec<User> = ["mm-old", "mm-new", "mm-other"]
        .iter()
        .map(|u| server.add_user(u, vec![Rule::all()]))
        .collect();
    let old = TestBroker::start_configured(
        "nmm",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&users[0])),
        fast_timing(),
        true,
        None,
        |c| {
            c.limits.handoff_concurrency = 1;
            c.limits.handoff_turn = Duration::from_secs(6);
        },
    );
    let other = TestBroker::start_configured(
        "nmm-b",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&users[2])),
        fast_timing(),
        true,
        None,
        |_| {},
    );
    let leaders = Leaders::start(&server, &old.socket, &other, "mm", APPS).await;
    let before = leaders.journal.lock().unwrap().len();
    let mut new = electord(
        &server,
        &users[1],
        "nmm",
        &old.socket,
        &["--takeover", "--on-shutdown=handoff"],
    );
    wait_until(
        "a first leader resumed at the successor",
        Duration::from_secs(30),
        || leaders.safe_count() >= 1,
    )
    .await;
    new.sigterm();
    assert!(new.exited().await.is_some(), "the successor exits promptly");
    let in_jeopardy = |journal: &Journal| -> std::collections::BTreeSet<String> {
        journal.lock().unwrap()[before..]
            .iter()
            .filter(|(_, w, e)| w.starts_with("app-") && matches!(e, CampaignEvent::Jeopardy { .. }))
            .map(|(_, w, _)| w.clone())
            .collect()
    };
    let moved = in_jeopardy(&leaders.journal);
    assert!(moved.len() < APPS, "everyone moved already: {moved:?}");
    leaders.until_settled("every leader safe at the old broker").await;
    // Past the next turn: nobody else moves.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(leaders.settled());
    assert_eq!(
        in_jeopardy(&leaders.journal),
        moved,
        "only the leaders moved before the successor stopped were ever in jeopardy"
    );
    leaders.check(&server).await;
    drop((old, other));
}

/// The socket file removed from under a serving broker (an operator's `rm`, a cleanup job):
/// there is no successor, so nobody may be moved anywhere. The broker takes its path back
/// (within a second) and every connection stays, undisturbed: no `jeopardy`, no `reconnect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_file_removed_from_under_the_broker_moves_nobody_into_the_void() {
    const APPS: usize = 40;
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let user = server.add_user("rm-old", vec![Rule::all()]);
    let old = electord(&server, &user, "nrm", &socket, &["--on-shutdown=handoff"]);
    let mut apps = Vec::new();
    for i in 0..APPS {
        let mut app = open_when_up(&socket).await;
        app.send(json!({"op":"campaign","election":format!("rm-{i}"),"identity":"app"}))
            .await;
        app.until("elected").await;
        apps.push(app);
    }
    for round in 0..5 {
        std::fs::remove_file(&socket).unwrap();
        metric_becomes(
            &old,
            "elector_socket_reclaims",
            f64::from(round + 1),
            Duration::from_secs(20),
        )
        .await;
        drop(open_when_up(&socket).await);
        for (i, app) in apps.iter_mut().enumerate() {
            while let Ok(e) = app.next_within(Duration::from_millis(20)).await {
                let moved = e.as_ref().is_none_or(|e| {
                    ["jeopardy", "reconnect", "lost"].contains(&e["event"].as_str().unwrap_or(""))
                });
                assert!(
                    !moved,
                    "round {round}: app {i} was told {e:?} (None: closed) although nobody took the path over"
                );
            }
        }
    }
    assert_eq!(old.metric("elector_connected_clients").await, Some(APPS as f64));
}

/// A superseded broker whose attempts to take the path back failed (the dead successor's
/// socket replaced by a regular file until five attempts failed, each doubling the silence the
/// next attempt waits for), then a new successor that takes over properly and serves for a while,
/// then dies. The failures belonged to the path's past: the broker must take the path back
/// from this successor as promptly as from any (a few checks), not after the inflated backoff
/// (here at least 4.8 s; up to 38 s), during which every app moved to the dead successor is refused
/// and its leaders ride out their guarantee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_answered_resets_the_backoff_of_failed_reclaims() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let user = server.add_user("bo-old", vec![Rule::all()]);
    let old = electord(&server, &user, "nbo", &socket, &["--on-shutdown=handoff"]);
    drop(open_when_up(&socket).await);
    let first = fake_successor(&socket);
    metric_becomes(&old, "elector_socket_superseded", 1.0, Duration::from_secs(20)).await;
    drop(first);
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, b"not a socket").unwrap();
    // Five failures: the next attempt would wait 96 checks (4.8 s) without the reset.
    let deadline = Instant::now() + Duration::from_secs(60);
    while old.log().matches("cannot be taken back").count() < 5 {
        assert!(Instant::now() < deadline, "the attempts failed: {}", old.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_file(&socket).unwrap();
    let second = fake_successor(&socket);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(old.metric("elector_socket_reclaims").await, Some(0.0));
    let died = Instant::now();
    drop(second);
    metric_becomes(&old, "elector_socket_reclaims", 1.0, Duration::from_secs(60)).await;
    let took = died.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the path was taken back {took:?} after the successor died"
    );
}

/// A successor killed and restarted at once (its pod restarts the container), its new process
/// renaming its socket over the path at about the moment the old broker takes the path back
/// (restarts spread over the three silent checks and beyond). Whatever the order of the two
/// renames, the node converges on one serving broker (the old one, or the restarted successor,
/// which the old one then follows), every leader resumes there in its term, the other broker
/// is left with no connection, and the path stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_restarted_while_the_old_broker_reclaims_converges_on_one_serving_broker() {
    const APPS: usize = 3;
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let users: Vec<User> = ["rs-old", "rs-new", "rs-other"]
        .iter()
        .map(|u| server.add_user(u, vec![Rule::all()]))
        .collect();
    let old = electord(&server, &users[0], "nrs", &socket, &["--on-shutdown=handoff"]);
    drop(open_when_up(&socket).await);
    let other = TestBroker::start_configured(
        "nrs-b",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&users[2])),
        fast_timing(),
        true,
        None,
        |_| {},
    );
    let leaders = Leaders::start(&server, &socket, &other, "rs", APPS).await;
    let to = ["--takeover", "--on-shutdown=handoff"];
    for (round, restart_after_ms) in [0u64, 60, 100, 120, 140, 160, 180, 220].into_iter().enumerate() {
        let path_before = inode(&socket);
        let mut first = electord(&server, &users[1], "nrs", &socket, &to);
        wait_until(
            "the successor took the path over",
            Duration::from_secs(30),
            || inode(&socket) != path_before,
        )
        .await;
        leaders
            .until_settled(&format!("round {round}: every leader safe at the successor"))
            .await;
        first.kill().await;
        tokio::time::sleep(Duration::from_millis(restart_after_ms)).await;
        let mut second = electord(&server, &users[1], "nrs", &socket, &to);
        let deadline = Instant::now() + Duration::from_secs(30);
        let serving = loop {
            let (so, sn) = (
                old.metric("elector_socket_superseded").await,
                second.metric("elector_socket_superseded").await,
            );
            let (co, cn) = (
                old.metric("elector_connected_clients").await,
                second.metric("elector_connected_clients").await,
            );
            let settled = leaders.settled();
            let apps = Some(APPS as f64);
            if settled && so == Some(0.0) && sn == Some(1.0) && co == apps && cn == Some(0.0) {
                break "old";
            }
            if settled && so == Some(1.0) && sn == Some(0.0) && co == Some(0.0) && cn == apps {
                break "restarted";
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: not converged: superseded old {so:?} restarted {sn:?}, connected old {co:?} restarted {cn:?}, leaders settled {settled}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let path = inode(&socket);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            inode(&socket),
            path,
            "round {round}: the {serving} broker serves, and the path stays put"
        );
        // Back to the old broker alone for the next round.
        second.kill().await;
        metric_becomes(&old, "elector_socket_superseded", 0.0, Duration::from_secs(20)).await;
        leaders
            .until_settled(&format!("round {round}: every leader safe at the old broker"))
            .await;
    }
    leaders.check(&server).await;
    drop(other);
}

/// The socket directory removed from under a serving broker, with everything in it (the
/// socket and its lock file: a cleanup of the run directory). The broker makes the directory
/// again, as it does when it starts, and serves its path (within seconds); its connections
/// stay undisturbed; and a second broker started without `--takeover` is still refused,
/// though the lock file it finds is a new one, because the first answers on the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_removed_from_under_the_broker_is_made_again_and_served() {
    let server = TestApiServer::start().await.unwrap();
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    let socket = dir.join("elector.sock");
    let user = server.add_user("rd-old", vec![Rule::all()]);
    let mut old = electord(&server, &user, "nrd", &socket, &["--on-shutdown=handoff"]);
    let mut app = open_when_up(&socket).await;
    app.send(json!({"op":"campaign","election":"rd","identity":"app"}))
        .await;
    let elected = app.until("elected").await;
    std::fs::remove_dir_all(&dir).unwrap();
    let back = tokio::time::timeout(Duration::from_secs(30), open_when_up(&socket)).await;
    assert!(
        back.is_ok(),
        "the broker did not serve its path again within 30 s; log:\n{}",
        old.log()
    );
    while let Ok(e) = app.next_within(Duration::from_millis(200)).await {
        let event = e.as_ref().map(|e| e["event"].as_str().unwrap_or("").to_string());
        assert!(
            event.as_deref().is_some_and(|e| e == "leader" || e == "renewed"),
            "the connection was disturbed: {e:?}"
        );
    }
    app.send(json!({"op":"status","id":"s"})).await;
    let status = app.until("status").await;
    assert_eq!(status["id"], "s", "{status}");
    // A second broker without --takeover: refused, the first answers on the path.
    let mut second = electord(&server, &user, "nrd", &socket, &[]);
    let exited = second.exited().await;
    assert!(
        exited.is_some_and(|s| !s.success()),
        "a second broker started beside a live one: {exited:?}"
    );
    assert!(
        second.log().contains("another electord is serving this socket"),
        "{}",
        second.log()
    );
    assert_eq!(old.child.try_wait().unwrap(), None);
    drop(elected);
}
