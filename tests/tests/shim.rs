//! elector-shim through its HTTP port, and the unchanged 2016 Node.js app on top of it.

use std::time::Duration;

use elector_tests::harness::{Backend, TestBroker, TestShim, fast_timing};
use elector_tests::http_get;
use elector_tests::kube_api::TestApiServer;
use tokio::time::Instant;

async fn name_of(shim: &TestShim) -> String {
    let (status, body) = http_get(shim.http_addr, "/any/path").await.expect("shim answers");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "exactly {{\"name\":...}}: {body}"
    );
    v["name"].as_str().unwrap().to_string()
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_reports_the_current_leader_and_an_unreachable_broker_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    // The broker is not there yet: no name, /healthz 503.
    let a = TestShim::start(&socket, "example", "pod-a", Duration::from_secs(2), "127.0.0.1:0");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(name_of(&a).await, "");
    assert_eq!(http_get(a.http_addr, "/healthz").await.unwrap().0, 503);

    let broker = TestBroker::start("node", dir.path(), Backend::Memory, fast_timing(), false);
    assert_eq!(broker.socket, socket);
    eventually("pod-a leads", Duration::from_secs(10), || async {
        name_of(&a).await == "pod-a"
    })
    .await;
    assert_eq!(http_get(a.http_addr, "/healthz").await.unwrap().0, 200);
    let b = TestShim::start(&socket, "example", "pod-b", Duration::from_secs(2), "127.0.0.1:0");
    eventually("pod-b sees pod-a", Duration::from_secs(5), || async {
        name_of(&b).await == "pod-a"
    })
    .await;

    // The leader's sidecar dies: the standby reports the new leader (itself) at once.
    let t = Instant::now();
    a.kill();
    eventually("pod-b leads", Duration::from_secs(5), || async {
        name_of(&b).await == "pod-b"
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "failover took {:?}",
        t.elapsed()
    );

    // The broker goes away: nobody is reported, and /healthz says why.
    broker.kill();
    eventually("name cleared", Duration::from_secs(5), || async {
        name_of(&b).await.is_empty()
    })
    .await;
    let (status, body) = http_get(b.http_addr, "/healthz").await.unwrap();
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewals_fail_stops_reporting_itself() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, user) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let a = TestShim::start(
        &broker.socket,
        "example",
        "pod-a",
        Duration::from_secs(2),
        "127.0.0.1:0",
    );
    eventually("pod-a leads", Duration::from_secs(10), || async {
        name_of(&a).await == "pod-a"
    })
    .await;
    let cut = Instant::now();
    server.faults(&user).partition(true);
    eventually("pod-a stops claiming", Duration::from_secs(5), || async {
        name_of(&a).await != "pod-a"
    })
    .await;
    // ttl 2 s: renew deadline 1 s, well before anyone else could take over (2 s).
    assert!(
        cut.elapsed() < Duration::from_millis(1800),
        "took {:?}",
        cut.elapsed()
    );
    // The 2016 record format: the shim's lock is an Endpoints object with the leader annotation.
    let eps = server.store().get(&elector_tests::kube_api::store::ObjectKey {
        resource: "endpoints",
        namespace: "default".into(),
        name: "example".into(),
    });
    let ann =
        eps.expect("endpoints lock")["metadata"]["annotations"]["control-plane.alpha.kubernetes.io/leader"]
            .as_str()
            .unwrap()
            .to_string();
    assert!(
        ann.contains(r#""holderIdentity":"pod-a","leaseDurationSeconds":2"#),
        "{ann}"
    );
    server.faults(&user).partition(false);
}

/// The 2016 app polls localhost:4040 (its own sidecar) every 5 s and serves on :8080; both
/// ports are fixed by the unchanged app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_2016_nodejs_app_reports_the_new_master_after_failover() {
    let node = which("node").expect("node (Node.js) must be installed: .ci/run installs it");
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start("node", dir.path(), Backend::Memory, fast_timing(), false);
    let ttl = Duration::from_secs(2);
    // Three pods: b leads, c stands by, a is the app's own sidecar on :4040.
    let b = TestShim::start(&broker.socket, "example", "pod-b", ttl, "127.0.0.1:0");
    eventually("pod-b leads", Duration::from_secs(10), || async {
        name_of(&b).await == "pod-b"
    })
    .await;
    let c = TestShim::start(&broker.socket, "example", "pod-c", ttl, "127.0.0.1:0");
    // c registers before a, so c is next in line.
    eventually("pod-c sees pod-b", Duration::from_secs(5), || async {
        name_of(&c).await == "pod-b"
    })
    .await;
    let a = TestShim::start(&broker.socket, "example", "pod-a", ttl, "127.0.0.1:4040");
    eventually("pod-a sees pod-b", Duration::from_secs(5), || async {
        name_of(&a).await == "pod-b"
    })
    .await;

    let app_js = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node/app.js");
    let mut app = tokio::process::Command::new(node)
        .arg(app_js)
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let app_addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let master = || async move {
        http_get(app_addr, "/")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    eventually("the app reports pod-b", Duration::from_secs(15), || async {
        master().await == "Master is pod-b"
    })
    .await;

    b.kill();
    eventually("the sidecars agree on pod-c", Duration::from_secs(5), || async {
        name_of(&a).await == "pod-c" && name_of(&c).await == "pod-c"
    })
    .await;
    eventually("the app reports pod-c", Duration::from_secs(15), || async {
        master().await == "Master is pod-c"
    })
    .await;
    let _ = app.kill().await;
    drop((a, c));
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// `--election Bad_Name` can never succeed: the shim says why and exits non-zero at once
/// (it used to retry forever), in text and in JSON logs; with a valid name and no broker yet
/// it keeps retrying (a transient error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_ends_the_shim_with_a_clear_message() {
    let shim = elector_tests::workspace_bin("elector-broker", "elector-shim");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");

    // No broker yet: transient, the shim keeps trying (and serves /healthz 503 meanwhile).
    let mut waiting = tokio::process::Command::new(&shim)
        .args(["--election", "example", "--id", "pod-a", "--ttl", "1m30s"])
        .arg("--socket")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "an unreachable broker is transient: the shim must keep retrying"
    );
    waiting.kill().await.unwrap();
    let out = waiting.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("retrying"), "{log}");

    let _broker = TestBroker::start("node", dir.path(), Backend::Memory, fast_timing(), false);
    for format in ["text", "json"] {
        let run = tokio::process::Command::new(&shim)
            .args(["--election", "Bad_Name", "--id", "pod-a", "--log-format", format])
            .arg("--socket")
            .arg(&socket)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the shim gives up instead of retrying forever")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{format}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("Error: the broker refused to campaign in election \"Bad_Name\"")
                && last.contains("invalid_election")
                && last.contains("not a valid object name"),
            "{format}: {stderr}"
        );
        if format == "json" {
            let logged: Vec<serde_json::Value> = stderr
                .lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
            assert!(
                logged.iter().any(|v| v["level"] == "ERROR"
                    && v["fields"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("invalid_election")),
                "{stderr}"
            );
        } else {
            assert!(
                !stderr.contains('\u{1b}'),
                "no colour when stderr is not a terminal: {stderr:?}"
            );
        }
    }

    // Each binary's --help describes itself.
    let help = std::process::Command::new(&shim).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.starts_with("elector-shim: a drop-in for the 2016 leader-elector sidecar"),
        "{help}"
    );
    // Go durations, as the original's --ttl.
    let bad = std::process::Command::new(&shim)
        .args(["--election", "example", "--ttl", "10sec"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("expected Go syntax")
            || String::from_utf8_lossy(&bad.stderr).contains("unknown unit")
    );
}
