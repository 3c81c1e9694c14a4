//! The `elector` command as users run it: real `elector` processes against a real `electord`
//! (standalone, or two "nodes" sharing the test API server), through the socket.
//!
//! `elector run`'s CMD is a shell snippet that appends `start`/`stop` lines with its term and a
//! nanosecond timestamp to a shared file: from that journal the tests check that no two CMDs
//! ever overlap, that terms grow, and how fast leadership moves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use elector_tests::harness::{TestBroker, fast_timing};
use elector_tests::kube_api::TestApiServer;
use elector_tests::workspace_bin;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Paths of the `elector` and `electord` binaries.
fn bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        (
            workspace_bin("elector-cli", "elector"),
            workspace_bin("elector-broker", "electord"),
        )
    })
}

fn elector() -> Command {
    let mut c = Command::new(&bins().0);
    c.env_remove("ELECTOR_SOCKET")
        .env_remove("ELECTOR_HTTP_ADDR")
        .env_remove("POD_NAME");
    c
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// A standalone `electord` process (locks in memory), with its stderr collected.
struct Electord {
    child: Child,
    socket: PathBuf,
    http_addr: String,
}

impl Electord {
    fn start(dir: &Path) -> Electord {
        let socket = dir.join("elector.sock");
        let mut child = Command::new(&bins().1)
            .args(["--standalone", "--http-addr", "127.0.0.1:0", "--log", "warn"])
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("electord starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split(", http ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let http_addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("electord did not start: {:?}", log.lock().unwrap()));
        Electord {
            child,
            socket,
            http_addr,
        }
    }
}

impl Drop for Electord {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `elector` process whose stdout and stderr go to files.
struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Proc {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = cmd
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("elector starts");
        Proc { child, out, err }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, s: Signal) {
        kill(self.pid(), s).unwrap();
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits for the exit code (panics after `limit`).
    fn exit_code(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or_else(|| panic!("killed by a signal: {s:?}"));
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of the CMD journal.
#[derive(Debug, Clone, PartialEq)]
struct Mark {
    what: String,
    who: String,
    term: u64,
    pid: u32,
    at_ns: u128,
}

/// CMD for `elector run`: journals `start`, then runs `body`; on SIGTERM journals `stop` and
/// exits 0 (unless `body` changes that).
fn journaling_cmd(journal: &Path, who: &str, body: &str) -> Vec<String> {
    let j = journal.display();
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mark() {{ echo \"$1 {who} $ELECTOR_TERM $$ $(date +%s%N)\" >> {j}; }}\n\
             mark start\n\
             trap 'mark stop; exit 0' TERM\n\
             {body}"
        ),
    ]
}

fn journal(path: &Path) -> Vec<Mark> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Mark {
                what: f[0].into(),
                who: f[1].into(),
                term: f[2].parse().unwrap(),
                pid: f[3].parse().unwrap(),
                at_ns: f[4].parse().unwrap(),
            }
        })
        .collect()
}

/// Runs of CMD from the journal, as (start, stop-or-None) in start order; panics if two
/// overlap (a start before the previous run's stop).
fn runs_without_overlap(marks: &[Mark]) -> Vec<(Mark, Option<Mark>)> {
    let mut runs: Vec<(Mark, Option<Mark>)> = Vec::new();
    for m in marks {
        match m.what.as_str() {
            "start" => {
                if let Some((prev, stop)) = runs.last() {
                    let stop = stop.as_ref().unwrap_or_else(|| {
                        panic!("{m:?} started while {prev:?} had not stopped: {marks:#?}")
                    });
                    assert!(
                        stop.at_ns <= m.at_ns,
                        "overlap: {m:?} started before {stop:?}: {marks:#?}"
                    );
                }
                runs.push((m.clone(), None));
            }
            "stop" => {
                let (start, stop) = runs.last_mut().expect("stop before any start");
                assert_eq!(start.pid, m.pid, "stop of another run: {marks:#?}");
                *stop = Some(m.clone());
            }
            other => panic!("journal line {other}"),
        }
    }
    runs
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_cmd(socket: &Path, identity: &str, extra: &[&str], cmd: &[String]) -> Command {
    let mut c = elector();
    c.arg("--socket")
        .arg(socket)
        .args(["run", "--election", "job", "--identity", identity])
        .args(extra)
        .arg("--")
        .args(cmd);
    c
}

/// Two instances whose CMD works ~150 ms and exits: leadership alternates through resigns, the
/// runs never overlap, every run has a higher term than the one before, and each handover takes
/// milliseconds (the broker's default lease is 15 s, so nothing here waits for an expiry).
#[test]
fn run_alternates_without_overlap_and_terms_grow() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let body = "sleep 0.15; mark stop";
    let a = Proc::spawn(
        run_cmd(&broker.socket, "pod-a", &[], &journaling_cmd(&j, "pod-a", body)),
        dir.path(),
        "a",
    );
    let b = Proc::spawn(
        run_cmd(&broker.socket, "pod-b", &[], &journaling_cmd(&j, "pod-b", body)),
        dir.path(),
        "b",
    );
    wait_for("8 complete runs", Duration::from_secs(60), || {
        journal(&j).iter().filter(|m| m.what == "stop").count() >= 8
    });
    drop((a, b));
    let marks = journal(&j);
    let runs = runs_without_overlap(&marks);
    let whos: std::collections::BTreeSet<_> = runs.iter().map(|(s, _)| s.who.clone()).collect();
    assert_eq!(whos.len(), 2, "both instances ran CMD: {marks:#?}");
    for pair in runs.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        assert!(next.0.term > prev.0.term, "ELECTOR_TERM grows: {marks:#?}");
        if let Some(stop) = &prev.1 {
            let gap = Duration::from_nanos((next.0.at_ns - stop.at_ns) as u64);
            assert!(gap < Duration::from_secs(3), "handover took {gap:?}: {marks:#?}");
        }
    }
}

/// SIGTERM to the leading instance: forwarded to CMD, which stops; only then does elector
/// resign, so the other instance starts after the stop, at once. The leader exits with CMD's
/// own code.
#[test]
fn sigterm_stops_cmd_before_the_other_instance_starts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    // CMD takes 300 ms to shut down, and exits 7.
    let body = "trap 'sleep 0.3; mark stop; exit 7' TERM\nwhile :; do sleep 0.05; done";
    let mut a = Proc::spawn(
        run_cmd(&broker.socket, "pod-a", &[], &journaling_cmd(&j, "pod-a", body)),
        dir.path(),
        "a",
    );
    wait_for("pod-a's CMD", Duration::from_secs(30), || !journal(&j).is_empty());
    let b = Proc::spawn(
        run_cmd(&broker.socket, "pod-b", &[], &journaling_cmd(&j, "pod-b", body)),
        dir.path(),
        "b",
    );
    wait_for("pod-b campaigns", Duration::from_secs(30), || {
        b.stderr().contains("campaigning")
    });
    a.signal(Signal::SIGTERM);
    assert_eq!(a.exit_code(Duration::from_secs(30)), 7, "{}", a.stderr());
    wait_for("pod-b's CMD", Duration::from_secs(30), || journal(&j).len() >= 3);
    let marks = journal(&j);
    let runs = runs_without_overlap(&marks);
    assert_eq!(runs[0].0.who, "pod-a");
    assert_eq!(runs[1].0.who, "pod-b");
    assert!(runs[1].0.term > runs[0].0.term);
    let stop = runs[0].1.as_ref().unwrap();
    let gap = Duration::from_nanos((runs[1].0.at_ns - stop.at_ns) as u64);
    assert!(gap < Duration::from_secs(3), "handover took {gap:?}");
    drop(b);
}

/// Whether process `pid` still runs (a zombie waiting for its reaper counts as gone).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// `elector run` killed with SIGKILL (an OOM kill): its guard kills CMD's whole process group
/// (the shell and the child it started) within moments, instead of leaving them to lead on,
/// orphaned, while the broker, which saw the connection close, elects the other instance.
#[test]
fn an_elector_killed_with_sigkill_takes_its_cmd_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let grandchild = dir.path().join("grandchild");
    let body = format!(
        "sleep 600 & echo $! > {}\nwhile :; do sleep 0.05; done",
        grandchild.display()
    );
    let mut a = Proc::spawn(
        run_cmd(&broker.socket, "pod-a", &[], &journaling_cmd(&j, "pod-a", &body)),
        dir.path(),
        "a",
    );
    wait_for("pod-a's CMD", Duration::from_secs(30), || {
        !journal(&j).is_empty() && std::fs::read_to_string(&grandchild).is_ok_and(|s| s.ends_with('\n'))
    });
    let shell = journal(&j)[0].pid;
    let sleeper: u32 = std::fs::read_to_string(&grandchild)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(runs(shell) && runs(sleeper));
    let b = Proc::spawn(
        run_cmd(
            &broker.socket,
            "pod-b",
            &[],
            &journaling_cmd(&j, "pod-b", "while :; do sleep 0.05; done"),
        ),
        dir.path(),
        "b",
    );
    wait_for("pod-b campaigns", Duration::from_secs(30), || {
        b.stderr().contains("campaigning")
    });
    a.signal(Signal::SIGKILL);
    let _ = a.child.wait();
    wait_for(
        "pod-a's CMD and its child to be killed",
        Duration::from_secs(10),
        || !runs(shell) && !runs(sleeper),
    );
    wait_for("pod-b's CMD", Duration::from_secs(30), || {
        journal(&j).iter().any(|m| m.who == "pod-b")
    });
    assert!(!a.stderr().contains("unguarded"), "{}", a.stderr());
    drop(b);
}

/// A CMD that ignores SIGTERM is SIGKILLed after --grace (and not before); the other instance
/// starts only after it is gone.
#[test]
fn a_cmd_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let stubborn = "trap '' TERM\nwhile :; do sleep 0.05; done";
    let mut a = Proc::spawn(
        run_cmd(
            &broker.socket,
            "pod-a",
            &["--grace", "1s"],
            &journaling_cmd(&j, "pod-a", stubborn),
        ),
        dir.path(),
        "a",
    );
    wait_for("pod-a's CMD", Duration::from_secs(30), || !journal(&j).is_empty());
    let first = journal(&j)[0].clone();
    let b = Proc::spawn(
        run_cmd(
            &broker.socket,
            "pod-b",
            &[],
            &journaling_cmd(&j, "pod-b", "while :; do sleep 0.05; done"),
        ),
        dir.path(),
        "b",
    );
    wait_for("pod-b campaigns", Duration::from_secs(30), || {
        b.stderr().contains("campaigning")
    });
    let sent = Instant::now();
    let sent_ns = now_ns();
    a.signal(Signal::SIGTERM);
    let cmd_proc = PathBuf::from(format!("/proc/{}", first.pid));
    wait_for("pod-a's CMD to be gone", Duration::from_secs(30), || {
        !cmd_proc.exists()
    });
    let gone = sent.elapsed();
    assert!(
        gone >= Duration::from_secs(1),
        "killed after {gone:?}, before the grace period"
    );
    // SIGKILL: 128 + 9, CMD's status passed on.
    assert_eq!(a.exit_code(Duration::from_secs(30)), 137, "{}", a.stderr());
    assert!(a.stderr().contains("SIGKILL"), "{}", a.stderr());
    wait_for("pod-b's CMD", Duration::from_secs(30), || journal(&j).len() >= 2);
    let b_start = journal(&j)[1].clone();
    assert_eq!(b_start.who, "pod-b");
    assert!(
        b_start.at_ns >= sent_ns + Duration::from_secs(1).as_nanos(),
        "pod-b started before pod-a's CMD was killed"
    );
    drop(b);
}

/// Two nodes, one broker each, sharing the test API server. The leader's broker dies (its
/// connection with it): the leader stops CMD (at once, or within what is left of its guarantee)
/// and, with --once, exits 75; the other node takes the lock only when the lease runs out,
/// after CMD stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_broker_stops_cmd_before_another_node_starts_it() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker_a, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let (broker_b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast_timing());
    let j = dir.path().join("journal");
    let body = "while :; do sleep 0.05; done";
    let (sa, sb, jj, d) = (
        broker_a.socket.clone(),
        broker_b.socket.clone(),
        j.clone(),
        dir.path().to_path_buf(),
    );
    let result = tokio::task::spawn_blocking(move || {
        let a = Proc::spawn(
            run_cmd(
                &sa,
                "pod-a",
                &["--once", "--grace", "5s"],
                &journaling_cmd(&jj, "pod-a", body),
            ),
            &d,
            "a",
        );
        wait_for("pod-a's CMD", Duration::from_secs(30), || {
            !journal(&jj).is_empty()
        });
        let b = Proc::spawn(
            run_cmd(&sb, "pod-b", &[], &journaling_cmd(&jj, "pod-b", body)),
            &d,
            "b",
        );
        wait_for("pod-b campaigns", Duration::from_secs(30), || {
            b.stderr().contains("campaigning")
        });
        (a, b)
    })
    .await
    .unwrap();
    let (mut a, b) = result;
    let killed_ns = now_ns();
    broker_a.kill();
    let (a_code, a_err) = tokio::task::spawn_blocking(move || {
        let code = a.exit_code(Duration::from_secs(30));
        (code, a.stderr())
    })
    .await
    .unwrap();
    assert_eq!(a_code, 75, "leadership lost with --once: {a_err}");
    // The broker's death is a `lost` (disconnected) or, when the broker gave a guarantee, a
    // jeopardy that runs out: either way CMD is stopped.
    assert!(a_err.contains("stopping CMD"), "{a_err}");
    let jj = j.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("pod-b's CMD", Duration::from_secs(30), || journal(&jj).len() >= 3)
    })
    .await
    .unwrap();
    let marks = journal(&j);
    let runs = runs_without_overlap(&marks);
    let stop = runs[0].1.as_ref().expect("pod-a's CMD journaled its stop");
    let stopped_after = Duration::from_nanos((stop.at_ns - killed_ns) as u64);
    assert!(
        stopped_after < Duration::from_secs(5),
        "CMD stopped {stopped_after:?} after the broker died (grace 5 s)"
    );
    assert_eq!(runs[1].0.who, "pod-b");
    assert!(runs[1].0.term > runs[0].0.term);
    drop((b, broker_b));
}

fn run_to_end(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("elector runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn with_socket(socket: &Path, args: &[&str]) -> Command {
    let mut c = elector();
    c.arg("--socket").arg(socket).args(args);
    c
}

/// `leader`, `observe`, `campaign` and `status`: their text and JSON outputs and exit codes,
/// and errors that name their cause.
#[test]
fn observe_leader_campaign_and_status_outputs_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let s = broker.socket.as_path();

    // Nobody leads yet: exit 3, nothing on stdout.
    let (code, out, err) = run_to_end(with_socket(s, &["leader", "job"]));
    assert_eq!((code, out.as_str()), (3, ""), "{err}");
    assert!(err.contains("nobody leads default/job"), "{err}");
    let (code, out, _) = run_to_end(with_socket(s, &["leader", "job", "--json"]));
    assert_eq!(code, 3);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["event"].as_str(), &v["leader"]),
        (Some("leader"), &Value::Null)
    );

    // An observer, then a campaign (through ELECTOR_SOCKET this time).
    let observer = Proc::spawn(with_socket(s, &["observe", "job"]), dir.path(), "observe");
    let observer_json = Proc::spawn(
        with_socket(s, &["observe", "job", "--json"]),
        dir.path(),
        "observe-json",
    );
    wait_for("observers", Duration::from_secs(30), || {
        observer.stdout().contains("nobody leads") && observer_json.stdout().contains("\"leader\"")
    });
    let mut c = elector();
    c.env("ELECTOR_SOCKET", s)
        .args(["campaign", "job", "--identity", "pod-a"]);
    let mut campaign = Proc::spawn(c, dir.path(), "campaign");
    wait_for("pod-a elected", Duration::from_secs(30), || {
        campaign.stdout().contains("elected: pod-a leads (term 0)")
    });
    let campaign_json = Proc::spawn(
        with_socket(s, &["campaign", "job", "--identity", "pod-b", "--json"]),
        dir.path(),
        "campaign-json",
    );
    wait_for("pod-b campaigning", Duration::from_secs(30), || {
        campaign_json
            .stderr()
            .contains("campaigning in default/job as pod-b")
    });
    let (code, out, err) = run_to_end(with_socket(s, &["leader", "job"]));
    assert_eq!((code, out.as_str()), (0, "pod-a\n"), "{err}");
    let (code, out, _) = run_to_end(with_socket(s, &["leader", "job", "--json"]));
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["leader"].as_str(), v["term"].as_u64()),
        (Some("pod-a"), Some(0))
    );

    // Status: the table and the JSON.
    let (code, out, err) = run_to_end({
        let mut c = elector();
        c.env("ELECTOR_HTTP_ADDR", &broker.http_addr).arg("status");
        c
    });
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE"), "{out}");
    // Two observers, and perhaps the last `leader` command's connection, still closing.
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells[..7],
        ["default", "job", "lease", "pod-a", "0", "yes", "pod-a*,pod-b"],
        "{out}"
    );
    let observers: usize = cells[7].parse().unwrap();
    assert!((2..=3).contains(&observers), "{out}");
    let (code, out, _) = run_to_end(with_socket(
        s,
        &["status", "--json", "--http-addr", &broker.http_addr],
    ));
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v[0]["leader"], "pod-a");
    assert_eq!(v[0]["candidates"].as_array().unwrap().len(), 2);

    // pod-a stops campaigning (SIGINT): it resigns, exits 0, and pod-b leads.
    campaign.signal(Signal::SIGINT);
    assert_eq!(
        campaign.exit_code(Duration::from_secs(30)),
        0,
        "{}",
        campaign.stderr()
    );
    assert!(
        campaign.stdout().contains("lost: term 0 (resigned)"),
        "{}",
        campaign.stdout()
    );
    wait_for("pod-b elected", Duration::from_secs(30), || {
        campaign_json.stdout().contains("\"event\":\"elected\"")
    });
    for line in campaign_json.stdout().lines() {
        let v: Value = serde_json::from_str(line).expect("one JSON event per line");
        assert!(
            ["leader", "elected"].contains(&v["event"].as_str().unwrap()),
            "{line}"
        );
    }
    wait_for("the observers see pod-b", Duration::from_secs(30), || {
        observer.stdout().contains("pod-b leads (term 1)")
    });
    let text = observer.stdout();
    let seen: Vec<&str> = text.lines().collect();
    assert!(seen[0].starts_with("nobody leads"), "{text}");
    assert!(text.contains("pod-a leads (term 0)"), "{text}");
    let leaders: Vec<Value> = observer_json
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(leaders.iter().all(|v| v["event"] == "leader"));
    assert!(leaders.iter().any(|v| v["leader"] == "pod-a"));

    // Errors name their cause.
    let (code, _, err) = run_to_end(with_socket(s, &["leader", "Bad_Name"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid_election") && err.contains("Bad_Name"),
        "{err}"
    );
    let missing = dir.path().join("no.sock");
    let (code, _, err) = run_to_end(with_socket(&missing, &["observe", "job"]));
    assert_eq!(code, 69);
    assert!(
        err.contains(&format!(
            "cannot reach the elector broker at {}",
            missing.display()
        )),
        "{err}"
    );
    let (code, _, err) = run_to_end(with_socket(&missing, &["run", "-e", "job", "--", "true"]));
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("is electord running"), "{err}");
    let (code, _, err) = run_to_end(with_socket(s, &["status", "--http-addr", "127.0.0.1:1"]));
    assert_eq!(code, 69);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    let (code, _, err) = run_to_end(with_socket(
        s,
        &["run", "-e", "job", "--grace", "soon", "--", "true"],
    ));
    assert_eq!(code, 2);
    assert!(err.contains("--grace"), "{err}");
    let (code, _, err) = run_to_end(with_socket(
        s,
        &[
            "run",
            "-e",
            "job2",
            "--identity",
            "x",
            "--once",
            "--",
            "/no/such/program",
        ],
    ));
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("/no/such/program"), "{err}");
    // `run --once`: CMD's own exit code.
    let (code, _, err) = run_to_end(with_socket(
        s,
        &[
            "run",
            "-e",
            "job3",
            "--identity",
            "x",
            "--once",
            "--",
            "sh",
            "-c",
            "exit 9",
        ],
    ));
    assert_eq!(code, 9, "{err}");
    drop((observer, observer_json, campaign_json));
}

/// Every subcommand's --help has an example.
#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["run", "observe", "leader", "campaign", "status"] {
        let (code, out, err) = run_to_end({
            let mut c = elector();
            c.args([sub, "--help"]);
            c
        });
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("Examples:") && out.contains(&format!("elector {sub}")),
            "{sub}: {out}"
        );
    }
    let (_, out, _) = run_to_end({
        let mut c = elector();
        c.arg("--help");
        c
    });
    assert!(out.contains("Exit codes:") && out.contains("69"), "{out}");
}

/// deploy/examples/leader-cron.yaml's command, unchanged but for where `elector` and the socket
/// are: the first replica runs the shell loop, the second takes over when the first stops.
#[test]
fn the_leader_cron_example_runs_its_loop_on_one_replica() {
    let yaml = std::fs::read_to_string(repo().join("deploy/examples/leader-cron.yaml")).unwrap();
    let d: Value = serde_yaml::from_str(&yaml).unwrap();
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    let command: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[0], "elector");
    assert_eq!(command[1], "run");
    let env = container["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "ELECTOR_SOCKET"));

    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let replica = |pod: &str| {
        let mut c = elector();
        c.args(&command[1..])
            .env("ELECTOR_SOCKET", &broker.socket)
            .env("POD_NAME", pod);
        Proc::spawn(c, dir.path(), pod)
    };
    let mut first = replica("report-cron-a");
    wait_for("the first replica's report", Duration::from_secs(30), || {
        first.stdout().contains("report by report-cron-a (term 0)")
    });
    let second = replica("report-cron-b");
    wait_for("the second replica campaigns", Duration::from_secs(30), || {
        second.stderr().contains("campaigning")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(second.stdout(), "", "only the leader runs the loop");
    // Pod deletion: SIGTERM to the container's entrypoint.
    first.signal(Signal::SIGTERM);
    first.exit_code(Duration::from_secs(30));
    wait_for("the second replica's report", Duration::from_secs(30), || {
        second.stdout().contains("report by report-cron-b (term 1)")
    });
}

/// A broker that cannot reach the API server: `leader` says who leads is unknown, and why (exit
/// 4, not "nobody", 3); `observe` prints the same; once the API answers again, the real leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_lock_is_unknown_not_nobody() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, user) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    server.faults(&user).partition(true);
    let out = tokio::process::Command::from(with_socket(&broker.socket, &["leader", "cut-off"]))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("who leads default/cut-off is unknown: "), "{err}");
    assert!(out.stdout.is_empty());
    let observer = Proc::spawn(
        with_socket(&broker.socket, &["observe", "cut-off"]),
        dir.path(),
        "observe",
    );
    let o = observer.out.clone();
    let seen = move |what: &'static str| {
        let o = o.clone();
        tokio::task::spawn_blocking(move || {
            wait_for(what, Duration::from_secs(30), || {
                std::fs::read_to_string(&o).unwrap_or_default().contains(what)
            })
        })
    };
    seen("unknown who leads").await.unwrap();
    assert!(!observer.stdout().contains("nobody"), "{}", observer.stdout());
    server.faults(&user).partition(false);
    let _campaign = Proc::spawn(
        with_socket(&broker.socket, &["campaign", "cut-off", "--identity", "pod-a"]),
        dir.path(),
        "campaign",
    );
    seen("pod-a leads").await.unwrap();
}

/// The live `elector guard` processes watching process group `group` (a zombie counts as gone).
fn guards_of(group: u32) -> Vec<u32> {
    let want = ["guard".to_string(), group.to_string()];
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.len() >= 3 && args[1..3] == want && runs(pid)
        })
        .collect()
}

/// The signal mask of process `pid` (`SigBlk` in its status), 0 once it is gone.
fn blocked_signals(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| u64::from_str_radix(l.strip_prefix("SigBlk:")?.trim(), 16).ok())
        .unwrap_or(0)
}

/// SIGKILLs process group `group` when dropped: a CMD that a failing test left running dies.
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

/// `elector run` as the leader of its own process group: what a shell's job (`kill -9 %1`),
/// `timeout -s KILL` or a supervisor's group kill SIGKILLs at once. The guard must not die with
/// it (it runs in a process group of its own): it still kills CMD's group.
#[test]
fn sigkill_to_electors_whole_process_group_still_takes_its_cmd_with_it() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let mut c = run_cmd(
        &broker.socket,
        "pod-a",
        &[],
        &journaling_cmd(&j, "pod-a", "while :; do sleep 0.05; done"),
    );
    c.process_group(0);
    let mut a = Proc::spawn(c, dir.path(), "a");
    wait_for("pod-a's CMD", Duration::from_secs(30), || !journal(&j).is_empty());
    let shell = journal(&j)[0].pid;
    let _cleanup = KillGroupOnDrop(shell);
    wait_for("pod-a's guard", Duration::from_secs(30), || {
        guards_of(shell).len() == 1
    });
    nix::sys::signal::killpg(a.pid(), Signal::SIGKILL).unwrap();
    let _ = a.child.wait();
    wait_for(
        "pod-a's CMD to be killed by its guard",
        Duration::from_secs(10),
        || !runs(shell),
    );
    wait_for("the guard's word", Duration::from_secs(10), || {
        a.stderr().contains("killed CMD's process group")
    });
}

/// The `elector` binary deleted (or replaced, as a package upgrade does) while `elector run`
/// waits to lead: the guard is still started, from the running image, so CMD is not left
/// unguarded.
#[test]
fn an_elector_whose_binary_was_deleted_still_guards_its_cmd() {
    let dir = tempfile::tempdir().unwrap();
    // Copied before any other process is started (a concurrent fork holding the copy's write
    // descriptor would make its exec fail with ETXTBSY).
    let copy = dir.path().join("elector");
    std::fs::copy(&bins().0, &copy).unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let holder = Proc::spawn(
        with_socket(&broker.socket, &["campaign", "job", "--identity", "holder"]),
        dir.path(),
        "holder",
    );
    wait_for("the holder elected", Duration::from_secs(30), || {
        holder.stdout().contains("elected: holder leads")
    });
    let mut c = Command::new(&copy);
    c.env_remove("ELECTOR_SOCKET")
        .env_remove("ELECTOR_HTTP_ADDR")
        .env_remove("POD_NAME")
        .arg("--socket")
        .arg(&broker.socket)
        .args(["run", "--election", "job", "--identity", "pod-a", "--"])
        .args(journaling_cmd(&j, "pod-a", "while :; do sleep 0.05; done"));
    let mut a = Proc::spawn(c, dir.path(), "a");
    wait_for("pod-a waits to lead", Duration::from_secs(30), || {
        a.stderr().contains("holder leads")
    });
    std::fs::remove_file(&copy).unwrap();
    holder.signal(Signal::SIGTERM);
    wait_for("pod-a's CMD", Duration::from_secs(30), || !journal(&j).is_empty());
    let shell = journal(&j)[0].pid;
    let _cleanup = KillGroupOnDrop(shell);
    wait_for("pod-a's guard", Duration::from_secs(30), || {
        guards_of(shell).len() == 1 || a.stderr().contains("unguarded")
    });
    assert!(!a.stderr().contains("unguarded"), "{}", a.stderr());
    a.signal(Signal::SIGKILL);
    let _ = a.child.wait();
    wait_for(
        "pod-a's CMD to be killed by its guard",
        Duration::from_secs(10),
        || !runs(shell),
    );
}

/// Ctrl-C in a terminal: SIGINT to the foreground process group (`elector` and whatever shares
/// its group). CMD still stops the normal way (the SIGINT forwarded, its trap runs, its exit
/// code passed on), and its guard stands down: it exits without killing anything.
#[test]
fn ctrl_c_stops_cmd_the_normal_way_and_its_guard_stands_down() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let ready = dir.path().join("ready");
    let body = format!(
        "trap 'mark stop; exit 5' INT\ntouch {}\nwhile :; do sleep 0.05; done",
        ready.display()
    );
    let mut c = run_cmd(&broker.socket, "pod-a", &[], &journaling_cmd(&j, "pod-a", &body));
    c.process_group(0);
    let mut a = Proc::spawn(c, dir.path(), "a");
    wait_for("pod-a's CMD, its trap set", Duration::from_secs(30), || {
        ready.exists()
    });
    let shell = journal(&j)[0].pid;
    wait_for("pod-a's guard", Duration::from_secs(30), || {
        guards_of(shell).len() == 1
    });
    nix::sys::signal::killpg(a.pid(), Signal::SIGINT).unwrap();
    assert_eq!(a.exit_code(Duration::from_secs(30)), 5, "{}", a.stderr());
    let marks = journal(&j);
    assert_eq!(marks.len(), 2, "{marks:#?}");
    assert_eq!(marks[1].what, "stop");
    wait_for("the guard to exit", Duration::from_secs(10), || {
        guards_of(shell).is_empty()
    });
    assert!(!a.stderr().contains("elector guard"), "{}", a.stderr());
}

/// `--restart-on-lead` with a CMD that exits at once, hundreds of times: every run's guard is
/// told to stand down and reaped; neither processes nor descriptors pile up in `elector`.
#[test]
fn hundreds_of_restarts_leak_no_guard_and_no_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let a = Proc::spawn(
        run_cmd(&broker.socket, "pod-a", &["--restart-on-lead"], &["true".into()]),
        dir.path(),
        "a",
    );
    let restarts = || a.stderr().matches("starting it again").count();
    wait_for("300 restarts", Duration::from_secs(120), || restarts() >= 300);
    let pid = a.pid().as_raw();
    let children = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<i32>()
                        .ok()
                })
                == Some(pid)
        })
        .count();
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(children < 30, "{children} children after {} restarts", restarts());
    assert!(
        descriptors < 40,
        "{descriptors} descriptors after {} restarts",
        restarts()
    );
}

/// A signal that ends `elector` by its default action (SIGUSR1, SIGALRM, ...), sent to every
/// `elector` process as `pkill -USR1 elector` does: the guard, which must outlive `elector`,
/// does not die of it too, and kills CMD's group.
#[test]
fn a_signal_that_kills_elector_and_its_guard_alike_still_takes_its_cmd_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let mut a = Proc::spawn(
        run_cmd(
            &broker.socket,
            "pod-a",
            &[],
            &journaling_cmd(&j, "pod-a", "while :; do sleep 0.05; done"),
        ),
        dir.path(),
        "a",
    );
    wait_for("pod-a's CMD", Duration::from_secs(30), || !journal(&j).is_empty());
    let shell = journal(&j)[0].pid;
    let _cleanup = KillGroupOnDrop(shell);
    wait_for("pod-a's guard", Duration::from_secs(30), || {
        guards_of(shell).len() == 1
    });
    let guard = guards_of(shell)[0];
    wait_for("the guard to block signals", Duration::from_secs(30), || {
        blocked_signals(guard) != 0
    });
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{guard}/comm")).unwrap(),
        "elector\n",
        "the name `pkill elector` matches"
    );
    for s in [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGALRM] {
        let _ = kill(Pid::from_raw(guard as i32), s);
    }
    a.signal(Signal::SIGUSR1);
    let _ = a.child.wait();
    wait_for(
        "pod-a's CMD to be killed by its guard",
        Duration::from_secs(10),
        || !runs(shell),
    );
}

/// What each of `pid`'s descriptors links to (`pipe:[N]`, `socket:[N]`, a path).
fn descriptors(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| Some(std::fs::read_link(e.ok()?.path()).ok()?.display().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing that would defeat the guard leaks: its pipe's writing end is held by `elector`
/// alone (not by CMD, nor by the guard itself, or the pipe would never close), and neither CMD
/// nor the guard holds a socket (a copy of the broker connection would keep it open, and the
/// leadership held, after `elector` died).
#[test]
fn only_elector_holds_the_guard_pipe_and_the_broker_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let a = Proc::spawn(
        run_cmd(
            &broker.socket,
            "pod-a",
            &[],
            &journaling_cmd(&j, "pod-a", "while :; do sleep 0.05; done"),
        ),
        dir.path(),
        "a",
    );
    wait_for("pod-a's CMD", Duration::from_secs(30), || !journal(&j).is_empty());
    let shell = journal(&j)[0].pid;
    let _cleanup = KillGroupOnDrop(shell);
    wait_for("pod-a's guard", Duration::from_secs(30), || {
        guards_of(shell).len() == 1
    });
    let guard = guards_of(shell)[0];
    let pipe = std::fs::read_link(format!("/proc/{guard}/fd/0"))
        .unwrap()
        .display()
        .to_string();
    assert!(pipe.starts_with("pipe:"), "the guard's stdin: {pipe}");
    let elector = a.pid().as_raw() as u32;
    let holding = |pid: u32| descriptors(pid).iter().filter(|d| **d == pipe).count();
    assert_eq!(holding(elector), 1, "elector: {:?}", descriptors(elector));
    assert_eq!(holding(guard), 1, "the guard: {:?}", descriptors(guard));
    assert_eq!(holding(shell), 0, "CMD: {:?}", descriptors(shell));
    // Sockets this test process holds (and may have passed down) are not elector's.
    let ours = descriptors(std::process::id());
    for (who, pid) in [("the guard", guard), ("CMD", shell)] {
        let fds = descriptors(pid);
        assert!(
            !fds.iter().any(|d| d.starts_with("socket:") && !ours.contains(d)),
            "{who}: {fds:?}"
        );
    }
    assert!(
        descriptors(elector).iter().any(|d| d.starts_with("socket:")),
        "elector's own connection is seen: {:?}",
        descriptors(elector)
    );
}

/// SIGHUP to `elector run` (the terminal it runs in hangs up, an ssh session drops, a
/// supervisor's `hup`): CMD stops the normal way, SIGHUP forwarded and its trap run within
/// --grace, as on SIGTERM, and elector exits with a code rather than die of the signal (it
/// used to, and its guard then SIGKILLed CMD's group at once, with no grace).
#[test]
fn sighup_stops_cmd_the_normal_way() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Electord::start(dir.path());
    let j = dir.path().join("journal");
    let ready = dir.path().join("ready");
    let body = format!(
        "trap 'mark stop; exit 0' HUP\ntouch {}\nwhile :; do sleep 0.05; done",
        ready.display()
    );
    let mut a = Proc::spawn(
        run_cmd(&broker.socket, "pod-a", &[], &journaling_cmd(&j, "pod-a", &body)),
        dir.path(),
        "a",
    );
    wait_for("pod-a's CMD, its traps set", Duration::from_secs(30), || {
        ready.exists()
    });
    let shell = journal(&j)[0].pid;
    let _cleanup = KillGroupOnDrop(shell);
    a.signal(Signal::SIGHUP);
    let code = a.child.wait().unwrap().code();
    assert!(code.is_some(), "elector died of SIGHUP; stderr: {}", a.stderr());
    let marks = journal(&j);
    assert_eq!(marks.last().unwrap().what, "stop", "CMD's trap ran: {marks:#?}");
}
