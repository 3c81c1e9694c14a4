//! Kubernetes Events on leadership changes (issue #15), through the real kube client against the
//! test API server, with real brokers:
//! - after a failover the server holds "became leader" Events about the Lease for both holders,
//!   with their terms and nodes;
//! - a preempted leader's Event is a Warning, a shutdown's says `broker_shutdown`;
//! - a flapping election (100 leadership changes) makes a bounded number of Event writes;
//! - `electord --events=false` (the real binary) writes none, and the same binary without the
//!   flag does;
//! - `kubectl describe lease` shows the Events (kubectl's own requests, field selectors
//!   included).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use elector_broker::events::{BURST, REFILL_EVERY, REPORTING_CONTROLLER};
use elector_client::protocol::LockKind;
use elector_client::{CampaignOptions, Client};
use elector_tests::harness::{TestBroker, fast_timing};
use elector_tests::kube_api::{Rule, TestApiServer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use tokio::time::Instant;

/// The Events about Lease `demo/<name>`, as any client lists them (by field selector).
async fn lease_events(server: &TestApiServer, name: &str) -> Vec<Event> {
    let admin = server.client(server.admin()).await.unwrap();
    let events: Api<Event> = Api::namespaced(admin, "demo");
    events
        .list(&ListParams::default().fields(&format!("regarding.kind=Lease,regarding.name={name}")))
        .await
        .unwrap()
        .items
}

/// Waits (generously) until `done` holds of the Events about Lease `demo/<name>`.
async fn wait_for_events(server: &TestApiServer, name: &str, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = lease_events(server, name).await;
        if done(&events) {
            return events;
        }
        assert!(Instant::now() < deadline, "never came; the Events: {events:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn note_of(e: &Event) -> &str {
    e.note.as_deref().unwrap_or_default()
}

/// Event writes (creates and patches) made by `user`.
fn event_writes(server: &TestApiServer, user: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.user == user && r.resource == "events" && r.is_write())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_both_holders_became_leader_events_carry_their_terms() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast_timing());
    let options = |identity: &str| {
        CampaignOptions::new("job", identity)
            .namespace("demo")
            .lock(LockKind::Lease)
    };
    let ca = Client::connect(&a.socket).await.unwrap();
    let first = ca.campaign(options("pod-a")).await.unwrap();
    let first_term = first.elected().await.unwrap();
    let cb = Client::connect(&b.socket).await.unwrap();
    let second = cb.campaign(options("pod-b")).await.unwrap();
    // node-a crashes: nothing is released, node-b takes over once the lease runs out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let second_term = tokio::time::timeout(Duration::from_secs(15), second.elected())
        .await
        .expect("pod-b takes over")
        .unwrap();
    assert!(second_term > first_term);

    let events = wait_for_events(&server, "job", |events| {
        events
            .iter()
            .any(|e| note_of(e).starts_with("pod-b became leader"))
    })
    .await;
    let admin = server.client(server.admin()).await.unwrap();
    let lease = Api::<Lease>::namespaced(admin, "demo").get("job").await.unwrap();
    for (identity, term, node) in [("pod-a", first_term, "node-a"), ("pod-b", second_term, "node-b")] {
        let note = format!("{identity} became leader (term {term}, node {node})");
        let e = events
            .iter()
            .find(|e| note_of(e) == note)
            .unwrap_or_else(|| panic!("no {note:?} in {events:#?}"));
        assert_eq!(e.reason.as_deref(), Some("LeaderElection"));
        assert_eq!(e.action.as_deref(), Some("BecameLeader"));
        assert_eq!(e.type_.as_deref(), Some("Normal"));
        assert_eq!(e.reporting_controller.as_deref(), Some(REPORTING_CONTROLLER));
        assert_eq!(e.reporting_instance.as_deref(), Some(node));
        assert!(e.event_time.is_some());
        let regarding = e.regarding.as_ref().unwrap();
        assert_eq!(
            (
                regarding.api_version.as_deref(),
                regarding.kind.as_deref(),
                regarding.namespace.as_deref(),
                regarding.name.as_deref(),
            ),
            (
                Some("coordination.k8s.io/v1"),
                Some("Lease"),
                Some("demo"),
                Some("job")
            )
        );
        assert_eq!(regarding.uid, lease.metadata.uid, "the Lease's uid");
    }
    drop((second, cb, ca, first, b));
}

/// A broker shutting down (SIGTERM, `--on-shutdown=release`) releases its leaders' locks and
/// records why: `released ... broker_shutdown` (the daemon flushes the Events queue before it
/// returns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_records_released_broker_shutdown_events() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let client = Client::connect(&broker.socket).await.unwrap();
    let c = client
        .campaign(CampaignOptions::new("job", "pod-a").namespace("demo"))
        .await
        .unwrap();
    let term = c.elected().await.unwrap();
    broker.shutdown();
    let note = format!("pod-a released leadership (term {term}, node node-a): broker_shutdown");
    let events = wait_for_events(&server, "job", |e| e.iter().any(|e| note_of(e) == note)).await;
    assert!(
        events
            .iter()
            .any(|e| note_of(e).starts_with("pod-a became leader"))
    );
    drop((c, client));
}

/// Someone else writes the Lease: the leader is told `lost` (`preempted`), and the Event is a
/// Warning that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_leader_gets_a_lost_leadership_warning() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let client = Client::connect(&broker.socket).await.unwrap();
    let c = client
        .campaign(CampaignOptions::new("job", "pod-a").namespace("demo"))
        .await
        .unwrap();
    let term = c.elected().await.unwrap();
    let admin = server.client(server.admin()).await.unwrap();
    Api::<Lease>::namespaced(admin, "demo")
        .patch(
            "job",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"holderIdentity": "intruder"}})),
        )
        .await
        .unwrap();
    let note = format!("pod-a lost leadership (term {term}, node node-a): preempted");
    let events = wait_for_events(&server, "job", |e| e.iter().any(|e| note_of(e) == note)).await;
    let lost = events.iter().find(|e| note_of(e) == note).unwrap();
    assert_eq!(
        (
            lost.type_.as_deref(),
            lost.action.as_deref(),
            lost.reason.as_deref()
        ),
        (Some("Warning"), Some("LostLeadership"), Some("LeaderElection"))
    );
    drop((c, client, broker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_election_makes_a_bounded_number_of_event_writes() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, user) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    // One connection per candidate: a connection campaigns once per election.
    let clients = [
        Client::connect(&broker.socket).await.unwrap(),
        Client::connect(&broker.socket).await.unwrap(),
    ];
    let options = |identity: &str| {
        CampaignOptions::new("flappy", identity)
            .namespace("demo")
            .lock(LockKind::Lease)
    };
    let started = Instant::now();
    let mut leader = clients[0].campaign(options("pod-0")).await.unwrap();
    leader.elected().await.unwrap();
    let mut waiting = clients[1].campaign(options("pod-1")).await.unwrap();
    // 100 leadership changes: the leader resigns, the other candidate is elected, the one that
    // resigned campaigns again.
    let mut changes = 1;
    while changes < 100 {
        leader.resign().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting.elected())
            .await
            .expect("the other candidate is elected")
            .unwrap();
        let resigned = changes % 2 == 1;
        changes += 1;
        leader = waiting;
        let again = if resigned { 0 } else { 1 };
        waiting = clients[again]
            .campaign(options(&format!("pod-{again}")))
            .await
            .unwrap();
    }
    drop(waiting);
    // Whatever was queued has been written (or given up) well within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elapsed = started.elapsed();

    let writes = event_writes(&server, &user.name);
    let bound = BURST as usize + (elapsed.as_secs_f64() / REFILL_EVERY.as_secs_f64()).floor() as usize;
    assert!(
        writes <= bound,
        "{writes} Event writes for {changes} leadership changes in {elapsed:?} (bound {bound})"
    );
    assert!(
        writes >= BURST as usize,
        "the first changes are written: {writes}"
    );
    // Repeats are aggregated: one Event per holder and change, counted in its series.
    let events = lease_events(&server, "flappy").await;
    assert!(events.len() <= 4, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e.series.as_ref().is_some_and(|s| s.count >= 2)),
        "{events:#?}"
    );
    // The rest were dropped, and counted.
    let (_, metrics) = elector_tests::http_get(broker.http_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    let rate_limited = metrics
        .lines()
        .find_map(|l| l.strip_prefix("elector_kubernetes_events_dropped_total{reason=\"rate_limited\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(rate_limited > 100, "{metrics}");
    drop((leader, clients, broker));
}

/// A real `electord` process against the test API server, with `extra` arguments.
fn electord(
    dir: &Path,
    server: &TestApiServer,
    node: &str,
    extra: &[&str],
) -> (tokio::process::Child, PathBuf) {
    let user = server.add_user(node, vec![Rule::all()]);
    let socket = dir.join(format!("{node}.sock"));
    let child = tokio::process::Command::new(elector_tests::workspace_bin("elector-broker", "electord"))
        .arg("--kubeconfig")
        .arg(server.kubeconfig_path(&user))
        .args(["--node-name", node, "--attest=none", "--http-addr", ""])
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
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("electord starts");
    (child, socket)
}

/// Campaigns as `identity` for Lease `demo/<election>` through `socket`, until elected, then
/// resigns: one `became leader` and one `released`.
async fn lead_once(socket: &Path, election: &str, identity: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket at {}", socket.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Client::connect(socket).await.unwrap();
    let c = client
        .campaign(CampaignOptions::new(election, identity).namespace("demo"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), c.elected())
        .await
        .expect("elected")
        .unwrap();
    c.resign().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn electord_with_events_false_records_none() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // The binary's default: Events.
    let (mut on, socket) = electord(dir.path(), &server, "node-on", &[]);
    lead_once(&socket, "with-events", "pod-a").await;
    let events = wait_for_events(&server, "with-events", |e| e.len() >= 2).await;
    assert!(
        events
            .iter()
            .any(|e| note_of(e).starts_with("pod-a released leadership")),
        "{events:#?}"
    );
    on.kill().await.unwrap();

    let (mut off, socket) = electord(dir.path(), &server, "node-off", &["--events=false"]);
    lead_once(&socket, "without-events", "pod-b").await;
    // Long enough for any Event to have been written (the other broker's came within this).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.user == "node-off" && r.resource == "events")
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect();
    assert!(requests.is_empty(), "{requests:?}");
    assert!(lease_events(&server, "without-events").await.is_empty());
    assert_eq!(event_writes(&server, "node-off"), 0);
    off.kill().await.unwrap();
}

use elector_tests::kubectl;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_describe_lease_shows_the_events() {
    let server = TestApiServer::start().await.unwrap();
    let anonymous = server.add_anonymous(vec![Rule::all()]);
    let kc = server.kubeconfig_path(&anonymous);
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let client = Client::connect(&broker.socket).await.unwrap();
    let first = client
        .campaign(CampaignOptions::new("job", "pod-a").namespace("demo"))
        .await
        .unwrap();
    let term = first.elected().await.unwrap();
    first.resign().await.unwrap();
    let events = wait_for_events(&server, "job", |e| e.len() >= 2).await;
    assert!(events.len() >= 2);

    let described = kubectl(&kc, &["-n", "demo", "describe", "lease", "job"]).await;
    let section = described
        .split_once("Events:")
        .unwrap_or_else(|| panic!("no Events section:\n{described}"))
        .1;
    for want in [
        format!("pod-a became leader (term {term}, node node-a)"),
        format!("pod-a released leadership (term {term}, node node-a): resigned"),
    ] {
        let line = section
            .lines()
            .find(|l| l.contains(&want))
            .unwrap_or_else(|| panic!("no {want:?} in:\n{described}"));
        assert!(
            line.contains("Normal") && line.contains("LeaderElection") && line.contains(REPORTING_CONTROLLER),
            "{line}"
        );
    }
    // kubectl asked for the Lease's Events by the core/v1 field selectors, uid included.
    let lease_uid = server
        .store()
        .get(&elector_tests::kube_api::store::ObjectKey {
            resource: "leases",
            namespace: "demo".into(),
            name: "job".into(),
        })
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let asked = server
        .requests()
        .into_iter()
        .find(|r| r.user == "system:anonymous" && r.resource == "events" && r.verb == "list")
        .expect("kubectl listed events");
    let query = asked.path.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let selector: String = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "fieldSelector")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    for part in [
        "involvedObject.name=job",
        "involvedObject.namespace=demo",
        "involvedObject.kind=Lease",
        &format!("involvedObject.uid={lease_uid}"),
    ] {
        assert!(selector.split(',').any(|p| p == part), "{part} in {selector:?}");
    }
    assert!(
        asked.path.starts_with("/api/v1/namespaces/demo/events"),
        "{}",
        asked.path
    );

    // `kubectl get events` through either API version.
    let notes = kubectl(
        &kc,
        &[
            "-n",
            "demo",
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].note}",
        ],
    )
    .await;
    assert!(notes.contains("pod-a became leader"), "{notes}");
    let messages = kubectl(
        &kc,
        &[
            "-n",
            "demo",
            "get",
            "events",
            "-o",
            "jsonpath={.items[*].message}",
        ],
    )
    .await;
    assert!(messages.contains("pod-a released leadership"), "{messages}");

    // The commands of docs/operations.md, "Events", as written there (placeholders filled).
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md")).unwrap();
    for (prefix, shows) in [
        ("kubectl describe lease <election>", "pod-a became leader"),
        ("kubectl get events -n <ns>", "pod-a released leadership"),
    ] {
        let line = doc
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("docs/operations.md has no `{prefix} ...` line"))
            .replace("<election>", "job")
            .replace("<ns>", "demo");
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .env("KUBECONFIG", &kc)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(shows),
            "{line}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop((client, broker));
}
