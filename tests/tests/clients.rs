//! The Python and Node.js clients (`clients/`), run through their own test runners against a
//! real `electord --standalone` process, so that the workspace's single test command covers
//! them: `python3 -m unittest` on the pip-installed package, `node --test`, and the
//! `examples/node-native` app. Each suite gets the broker binary as `$ELECTORD` and starts the
//! brokers it needs (some tests restart them): standalone ones, and for broker survival
//! (protocol 1.1: a leader rides out a broker's SIGKILL and restart, or a rolling upgrade with
//! `--takeover` that moves it to the successor) ones on a test Kubernetes API server run here,
//! whose kubeconfig is `$ELECTOR_KUBECONFIG` (standalone locks die with their broker). The suites also play the shared conformance scripts (`clients/conformance`),
//! like `tests/tests/conformance.rs` does for Rust.
//! Nothing is installed from the network here: `.ci/run` provides python3 (with pip,
//! setuptools and wheel) and node.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use elector_tests::kube_api::{Rule, TestApiServer};
use tokio::io::{AsyncBufReadExt, BufReader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace's `electord` binary.
fn electord() -> PathBuf {
    elector_tests::workspace_bin("elector-broker", "electord")
}

/// A test API server for the suites' brokers, and the kubeconfig of a node user on it.
async fn api_server() -> (TestApiServer, PathBuf) {
    let server = TestApiServer::start().await.expect("test API server");
    let user = server.add_user("node-a", vec![Rule::all()]);
    let kubeconfig = server.kubeconfig_path(&user);
    (server, kubeconfig)
}

/// Runs a suite on a blocking thread, while the test API server serves on this runtime.
async fn run_blocking(what: &'static str, mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || run(what, &mut cmd))
        .await
        .expect("the suite's thread")
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    eprintln!("{text}");
    out
}

/// Copies a directory tree (the Python package is built from a copy, so that setuptools'
/// build directories never land in the source tree).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "__pycache__" || name == "build" || name.to_string_lossy().ends_with(".egg-info") {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_installs_with_pip_and_passes_its_suite() {
    let electord = electord();
    let (_server, kubeconfig) = api_server().await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    let site = work.path().join("site");
    copy_tree(&repo().join("clients/python"), &source);
    // `pip install ./clients/python`, offline (build tools come with python3, see .ci/run).
    run(
        "pip install",
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--no-build-isolation",
            ])
            .args(["--disable-pip-version-check", "--quiet", "--target"])
            .arg(&site)
            .arg(&source),
    );
    assert!(
        site.join("elector_client/py.typed").is_file(),
        "the installed package is marked typed"
    );
    // The suite imports the installed copy: the source's src/ is not on the path.
    let mut suite = Command::new("python3");
    suite
        .args(["-m", "unittest", "discover", "-v", "-s", "tests", "-t", "."])
        .current_dir(repo().join("clients/python"))
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("ELECTORD", &electord)
        .env("ELECTOR_KUBECONFIG", &kubeconfig)
        .env("ELECTOR_CONFORMANCE_DIR", repo().join("clients/conformance"));
    let out = run_blocking("python3 -m unittest", suite).await;
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("test_every_script"), "conformance ran: {report}");
    assert!(
        report.contains(
            "BrokerSurvival.test_broker_killed_and_restarted_within_the_deadline_costs_no_leadership) ... ok"
        ),
        "broker survival ran: {report}"
    );
    assert!(!report.contains("skipped"), "nothing may be skipped: {report}");
    let imported = run(
        "import",
        Command::new("python3")
            .args(["-c", "import elector_client; print(elector_client.__file__)"])
            .current_dir(work.path())
            .env("PYTHONPATH", &site),
    );
    assert!(String::from_utf8_lossy(&imported.stdout).starts_with(site.to_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_passes_its_suite() {
    let electord = electord();
    let (_server, kubeconfig) = api_server().await;
    let mut suite = Command::new("node");
    suite
        .args(["--test", "test/conformance.test.js", "test/broker.test.js"])
        .current_dir(repo().join("clients/node"))
        .env("ELECTORD", &electord)
        .env("ELECTOR_KUBECONFIG", &kubeconfig)
        .env("ELECTOR_CONFORMANCE_DIR", repo().join("clients/conformance"));
    let out = run_blocking("node --test", suite).await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("# fail 0"), "{report}");
    assert!(report.contains("conformance: campaign_elected"), "{report}");
    assert!(report.contains("conformance: jeopardy_then_safe"), "{report}");
    for passed in [
        "a broker killed and restarted within the deadline costs no leadership",
        "process.hrtime.bigint() reads electord's CLOCK_MONOTONIC",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with("ok ") && l.contains(passed)),
            "{passed}: {report}"
        );
    }
    assert!(report.contains("# skipped 0"), "{report}");
}

/// A running app instance, with its stdout lines.
struct App {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl App {
    fn spawn(socket: &Path, node_path: &Path, identity: &str) -> App {
        let mut child = tokio::process::Command::new("node")
            .arg(repo().join("examples/node-native/app.js"))
            .env("ELECTOR_SOCKET", socket)
            .env("NODE_PATH", node_path)
            .env("POD_NAME", identity)
            .env("ELECTION", "example")
            .env("PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                let _ = tx.send(l);
            }
        });
        App {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix` and returns it.
    async fn expect(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                _ => panic!("no line starting with {prefix:?}; saw {:?}", self.seen),
            }
        }
    }

    async fn port(&mut self) -> u16 {
        let line = self.expect("serving on port ").await;
        line["serving on port ".len()..].trim().parse().expect("port")
    }
}

/// `GET /` on the app's port: its body.
async fn master(port: u16) -> String {
    elector_tests::http_get(([127, 0, 0, 1], port).into(), "/")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

async fn eventually_serves(port: u16, prefix: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = master(port).await;
        if body.starts_with(prefix) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} serves {body:?}, not {prefix:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The 2016 app ported to the native client: two instances; the first leads and both serve
/// "Master is pod-a"; when it is killed the other is pushed the change at once and serves
/// itself as master, with a higher term. When the broker dies, that master stays the master in
/// jeopardy until its guarantee runs out (the standalone broker is not restarted), then serves
/// "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_native_example_fails_over_by_push() {
    let electord = electord();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elector.sock");
    let mut broker = tokio::process::Command::new(&electord)
        .args(["--standalone", "--http-addr", "", "--log", "error"])
        .args([
            "--lease-duration",
            "2",
            "--renew-deadline",
            "1.5",
            "--retry-period",
            "0.25",
        ])
        .arg("--socket")
        .arg(&socket)
        .kill_on_drop(true)
        .spawn()
        .expect("electord starts");
    // `require('elector-client')` resolves to clients/node through NODE_PATH (no npm install).
    let node_path = dir.path().join("node_modules");
    std::fs::create_dir_all(&node_path).unwrap();
    std::os::unix::fs::symlink(repo().join("clients/node"), node_path.join("elector-client")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "electord did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut a = App::spawn(&socket, &node_path, "pod-a");
    let port_a = a.port().await;
    a.expect("elected").await;
    let mut b = App::spawn(&socket, &node_path, "pod-b");
    let port_b = b.port().await;
    let first = eventually_serves(port_a, "Master is pod-a").await;
    eventually_serves(port_b, &first).await;
    let _ = a.child.kill().await;
    b.expect("elected").await;
    let second = eventually_serves(port_b, "Master is pod-b").await;
    let term = |body: &str| -> u64 { body.rsplit(' ').next().unwrap().trim().parse().expect("term") };
    assert!(term(&second) > term(&first), "{second:?} after {first:?}");
    let _ = broker.kill().await;
    b.expect("jeopardy: the broker went away; still the master").await;
    assert_eq!(
        master(port_b).await,
        second,
        "a master in jeopardy stays the master"
    );
    b.expect("lost: broker_unavailable").await;
    eventually_serves(port_b, "Master is unknown").await;
    let _ = b.child.kill().await;
}
