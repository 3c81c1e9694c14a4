//! Every example app, run as its own process against a standalone broker, through the socket:
//! the first instance leads; when it is killed, the second one is elected.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use elector_tests::harness::{Backend, TestBroker, fast_timing};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running example with its stdout lines.
struct App {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl App {
    fn spawn(mut cmd: Command) -> App {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("example starts");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
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

    /// Waits for a line containing `text`.
    async fn expect(&mut self, text: &str) {
        if self.seen.iter().any(|l| l.contains(text)) {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => {
                    let hit = l.contains(text);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                _ => panic!("no line with {text:?}; saw {:?}", self.seen),
            }
        }
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn two_instances(make: impl Fn(&str) -> Command, elected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start("laptop", dir.path(), Backend::Memory, fast_timing(), false);
    let socket = broker.socket.to_str().unwrap().to_string();
    let mut a = App::spawn({
        let mut c = make("pod-a");
        c.env("ELECTOR_SOCKET", &socket);
        c
    });
    a.expect(elected).await;
    let mut b = App::spawn({
        let mut c = make("pod-b");
        c.env("ELECTOR_SOCKET", &socket);
        c
    });
    b.expect("pod-a").await; // the standby sees who leads
    a.kill().await;
    b.expect(elected).await;
    b.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example() {
    two_instances(
        |id| {
            let mut c = Command::new("python3");
            c.arg(repo().join("examples/python/leader.py"))
                .args(["--election", "report-job", "--id", id]);
            c
        },
        "elected term",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcat_example() {
    two_instances(
        |id| {
            let mut c = Command::new("sh");
            c.arg(repo().join("examples/netcat/campaign.sh"))
                .args(["report-job", id]);
            c
        },
        "\"event\":\"elected\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_example() {
    // As `cargo nextest run --workspace` built it (examples/tests/binaries.rs is why).
    let bin = elector_tests::workspace_bin("elector-examples", "leader-worker");
    two_instances(
        |id| {
            let mut c = Command::new(&bin);
            c.args(["--election", "report-job", "--id", id]);
            c
        },
        "working: batch",
    )
    .await;
}
