//! The first `leader` event is true (issue: an observer was first told `leader: null` while
//! someone led): a broker claims nothing it has not read from the lock, and says so when it
//! cannot read it. Across nodes, for `observe` and `campaign`, both lock kinds, the one-shot
//! `nc` command of the docs, the shim, and an API that refuses or does not answer.

use std::process::Stdio;
use std::time::Duration;

use elector_client::protocol::{LockKind, Timing};
use elector_client::{Campaign, CampaignOptions, Client};
use elector_tests::RawClient;
use elector_tests::harness::{TestBroker, TestShim, fast_timing};
use elector_tests::kube_api::TestApiServer;
use serde_json::{Value, json};
use tokio::time::Instant;

const TIMING: Timing = Timing {
    lease_duration: Some(2),
    renew_deadline: Some(1.5),
    retry_period: Some(0.25),
};

/// Events up to and including the first `leader` event.
async fn through_first_leader(c: &mut RawClient) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = c.next().await.expect("events until the first leader event");
        let done = e["event"] == "leader";
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// Waits (at most 15 s) until `campaign` leads.
async fn elected_within_15s(campaign: &Campaign) {
    tokio::time::timeout(Duration::from_secs(15), campaign.elected())
        .await
        .expect("elected within 15 s")
        .expect("connected");
}

async fn first_event_names_the_holder(lock: LockKind) {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (o1, _) = TestBroker::on_server(&server, "o1", dir.path(), fast_timing());
    let (o2, _) = TestBroker::on_server(&server, "o2", dir.path(), fast_timing());

    // pod-b leads on o2.
    let client = Client::connect(&o2.socket).await.unwrap();
    let campaign = client
        .campaign(
            CampaignOptions::new("obs-test", "pod-b")
                .lock(lock)
                .timing(TIMING),
        )
        .await
        .unwrap();
    elected_within_15s(&campaign).await;
    let term = campaign.state().borrow().term;

    // A fresh observer on o1 (which has never seen this election): `ok`, then the holder.
    let mut observer = RawClient::open(&o1.socket).await;
    observer
        .send(json!({"op":"observe","id":1,"election":"obs-test","lock":lock.as_str()}))
        .await;
    let seen = through_first_leader(&mut observer).await;
    assert_eq!(seen.len(), 2, "ok, then leader: {seen:?}");
    assert_eq!(
        (seen[0]["event"].as_str(), seen[0]["id"].as_i64()),
        (Some("ok"), Some(1))
    );
    assert_eq!(seen[1]["leader"], "pod-b", "{seen:?}");
    assert_eq!(seen[1]["term"].as_u64(), term);
    assert_eq!(seen[1]["is_me"], false);
    assert!(seen[1].get("unknown").is_none(), "{seen:?}");

    // A fresh candidate on o1 in an election o1 already watches: the same.
    let mut candidate = RawClient::open(&o1.socket).await;
    candidate
        .send(
            json!({"op":"campaign","id":2,"election":"obs-test","identity":"pod-c",
            "lock":lock.as_str(),"timing":{"lease_duration":2,"renew_deadline":1.5,"retry_period":0.25}}),
        )
        .await;
    let seen = through_first_leader(&mut candidate).await;
    assert_eq!(seen[0]["event"], "ok", "{seen:?}");
    assert_eq!(seen.last().unwrap()["leader"], "pod-b", "{seen:?}");

    // A candidate on a third broker that has never seen the election.
    let (o3, _) = TestBroker::on_server(&server, "o3", dir.path(), fast_timing());
    let mut fresh = RawClient::open(&o3.socket).await;
    fresh
        .send(
            json!({"op":"campaign","id":3,"election":"obs-test","identity":"pod-d",
            "lock":lock.as_str(),"timing":{"lease_duration":2,"renew_deadline":1.5,"retry_period":0.25}}),
        )
        .await;
    let seen = through_first_leader(&mut fresh).await;
    assert_eq!(seen.len(), 2, "ok, then leader: {seen:?}");
    assert_eq!(seen[1]["leader"], "pod-b", "{seen:?}");

    // The one-shot "who leads?" of PROTOCOL.md, run as written (with the socket path).
    let line =
        serde_json::to_string(&json!({"op":"observe","election":"obs-test","lock":lock.as_str()})).unwrap();
    let script = format!(
        "printf '%s\\n' '{line}' | nc -U -q1 {} | grep '\"leader\"'",
        o1.socket.display()
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("sh runs");
    let printed = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(
        events.len(),
        1,
        "one leader line: {printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(events[0]["leader"], "pod-b", "{printed}");
    drop((o1, o2, o3));
}

#[tokio::test]
async fn first_leader_event_names_the_holder_on_a_lease() {
    first_event_names_the_holder(LockKind::Lease).await;
}

#[tokio::test]
async fn first_leader_event_names_the_holder_on_endpoints() {
    first_event_names_the_holder(LockKind::Endpoints).await;
}

#[tokio::test]
async fn the_shim_never_serves_a_wrong_name() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (o1, _) = TestBroker::on_server(&server, "o1", dir.path(), fast_timing());
    let (o2, _) = TestBroker::on_server(&server, "o2", dir.path(), fast_timing());
    let client = Client::connect(&o2.socket).await.unwrap();
    // The shim campaigns on the 2016 sidecar's lock, an Endpoints object.
    let campaign = client
        .campaign(
            CampaignOptions::new("shim-test", "pod-b")
                .lock(LockKind::Endpoints)
                .timing(TIMING),
        )
        .await
        .unwrap();
    elected_within_15s(&campaign).await;
    // The 2016 sidecar's standby on o1: from its first answer on, never a name other than the
    // holder's ("" while it does not know yet).
    let shim = TestShim::start(
        &o1.socket,
        "shim-test",
        "pod-s",
        Duration::from_secs(2),
        "127.0.0.1:0",
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((200, body)) = elector_tests::http_get(shim.http_addr, "/").await {
            let v: Value = serde_json::from_str(&body).unwrap();
            let name = v["name"].as_str().unwrap().to_string();
            assert!(name.is_empty() || name == "pod-b", "the shim said {name:?}");
            if name == "pod-b" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the shim never names pod-b");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shim.kill();
}

#[tokio::test]
async fn an_api_that_does_not_answer_is_reported_as_unknown() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (o1, user) = TestBroker::on_server(&server, "o1", dir.path(), fast_timing());
    server.faults(&user).partition(true);
    let mut c = RawClient::open(&o1.socket).await;
    let sent = Instant::now();
    c.send(
        json!({"op":"campaign","id":1,"election":"cut-off","identity":"pod-a",
        "timing":{"lease_duration":2,"renew_deadline":1.5,"retry_period":0.25}}),
    )
    .await;
    let seen = through_first_leader(&mut c).await;
    let waited = sent.elapsed();
    assert_eq!(seen[0]["event"], "ok", "{seen:?}");
    let leader = seen.last().unwrap();
    assert_eq!(leader["leader"], Value::Null);
    let why = leader["unknown"]
        .as_str()
        .unwrap_or_else(|| panic!("unknown, not null: {leader}"));
    assert!(why.contains("not answered"), "{why}");
    // And the `status` op says so too.
    c.send(json!({"op":"status","id":"s"})).await;
    let status = c.until("status").await;
    assert!(status["campaigns"][0]["unknown"].as_str().is_some(), "{status}");
    // Generous bound: the broker says so after a retry period (0.25 s), long before the renew
    // deadline of even the default timing.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    server.faults(&user).partition(false);
    // Healed: the real view follows (the candidate takes the free lock).
    assert_eq!(c.until("elected").await["identity"], "pod-a");
}

/// `electord` as users run it, pointed at an API server that refuses connections: the app is
/// told the leader is unknown and why, and the log names the server and the cause.
#[tokio::test]
async fn a_refused_api_is_named_in_the_event_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("e.sock");
    let mut child = tokio::process::Command::new(elector_tests::workspace_bin("elector-broker", "electord"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--node-name", "n1", "--attest=none", "--http-addr", "127.0.0.1:0"])
        .arg("--socket")
        .arg(&socket)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("electord starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = RawClient::open(&socket).await;
    c.send(json!({"op":"observe","id":1,"election":"refused"})).await;
    let seen = through_first_leader(&mut c).await;
    assert_eq!(seen[0]["event"], "ok");
    let why = seen.last().unwrap()["unknown"]
        .as_str()
        .unwrap_or_else(|| panic!("{seen:?}"))
        .to_string();
    assert!(why.to_lowercase().contains("connect"), "the cause: {why}");
    drop(c);
    let _ = child.start_kill();
    let out = child.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let server = format!("127.0.0.1:{port}");
    assert!(
        log.lines().any(|l| l.contains("unknown") && l.contains(&server)),
        "a log line names the server {server}:\n{log}"
    );
}
