//! Elections across brokers ("nodes") against the test API server, through the real kube client
//! and the real socket, with elector-client as the applications.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use elector_broker::registry::Defaults;
use elector_client::protocol::{LockKind, LostReason, Timing};
use elector_client::{Campaign, CampaignEvent, CampaignOptions, Client};
use elector_tests::harness::{TestBroker, fast_timing};
use elector_tests::kube_api::{InjectedError, TestApiServer};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use tokio::time::Instant;

/// Every event every candidate received, on one clock.
#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<(Instant, String, CampaignEvent)>>>);

impl Journal {
    fn all(&self) -> Vec<(Instant, String, CampaignEvent)> {
        self.0.lock().unwrap().clone()
    }
    fn elected_after(&self, t: Instant) -> Vec<(Instant, String)> {
        self.all()
            .into_iter()
            .filter(|(at, _, e)| *at >= t && matches!(e, CampaignEvent::Elected { .. }))
            .map(|(at, who, _)| (at, who))
            .collect()
    }
    fn lost_of(&self, who: &str) -> Option<(Instant, LostReason)> {
        self.all().into_iter().find_map(|(at, w, e)| match e {
            CampaignEvent::Lost { reason, .. } if w == who => Some((at, reason)),
            _ => None,
        })
    }
}

struct Candidate {
    name: String,
    campaign: Campaign,
    _client: Client,
}

const TIMING: Timing = Timing {
    lease_duration: Some(2),
    renew_deadline: Some(1.5),
    retry_period: Some(0.25),
};

async fn candidate(broker: &TestBroker, name: &str, lock: LockKind, journal: &Journal) -> Candidate {
    let client = Client::connect(&broker.socket).await.expect("connect");
    let mut campaign = client
        .campaign(
            CampaignOptions::new("shared-job", name)
                .namespace("demo")
                .lock(lock)
                .timing(TIMING),
        )
        .await
        .expect("campaign");
    let mut events = campaign.events();
    let (journal, who) = (journal.clone(), name.to_string());
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            journal.0.lock().unwrap().push((Instant::now(), who.clone(), e));
        }
    });
    Candidate {
        name: name.to_string(),
        campaign,
        _client: client,
    }
}

/// Waits until exactly one candidate leads and every candidate agrees on leader and term.
async fn settled_leader(cands: &[Candidate]) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leaders: Vec<&Candidate> = cands.iter().filter(|c| c.campaign.is_leader()).collect();
        let states: Vec<_> = cands
            .iter()
            .map(|c| c.campaign.state().borrow().clone())
            .collect();
        if leaders.len() == 1 {
            let l = leaders[0];
            let term = l.campaign.state().borrow().term;
            if states
                .iter()
                .all(|s| s.leader.as_deref() == Some(l.name.as_str()) && s.term == term)
            {
                return (l.name.clone(), term.unwrap_or(0));
            }
        }
        assert!(leaders.len() <= 1, "two leaders: {states:?}");
        assert!(Instant::now() < deadline, "no settled leader: {states:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn three_by_three(lock: LockKind) {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let mut brokers = Vec::new();
    for n in ["node-a", "node-b", "node-c"] {
        brokers.push(TestBroker::on_server(&server, n, dir.path(), fast_timing()).0);
    }
    let mut cands = Vec::new();
    for (bi, b) in brokers.iter().enumerate() {
        for ci in 0..3 {
            cands.push(candidate(b, &format!("pod-{bi}-{ci}"), lock, &journal).await);
        }
    }
    let (leader, term) = settled_leader(&cands).await;
    let leader_broker = leader.as_bytes()[4] - b'0';

    // The leading candidate leaves: the next local candidate leads, in one write.
    server.clear_requests();
    let t0 = Instant::now();
    let idx = cands.iter().position(|c| c.name == leader).unwrap();
    let gone = cands.remove(idx);
    gone.campaign.resign().await.unwrap();
    let (next, next_term) = settled_leader(&cands).await;
    assert_eq!(
        next.as_bytes()[4] - b'0',
        leader_broker,
        "{next} is on the same node as {leader}"
    );
    assert!(next_term > term, "terms grow: {term} -> {next_term}");
    let handover_writes = server
        .requests()
        .iter()
        .filter(|r| {
            r.is_write()
                && r.at >= t0.into_std()
                && r.user == format!("node-{}", ["a", "b", "c"][leader_broker as usize])
        })
        .count();
    assert!(handover_writes >= 1, "the handover is a write");

    // The leading node's last candidates leave: another node leads within a second.
    let mine: Vec<usize> = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.name.as_bytes()[4] - b'0' == leader_broker)
        .map(|(i, _)| i)
        .collect();
    let t1 = Instant::now();
    for i in mine.into_iter().rev() {
        cands.remove(i).campaign.resign().await.unwrap();
    }
    let (other, _) = settled_leader(&cands).await;
    assert_ne!(other.as_bytes()[4] - b'0', leader_broker);
    let took = journal.elected_after(t1).first().map(|(at, _)| *at - t1).unwrap();
    assert!(
        took < Duration::from_secs(1),
        "cross-node failover after release took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_three_candidates_lease() {
    three_by_three(LockKind::Lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_three_candidates_endpoints() {
    three_by_three(LockKind::Endpoints).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_leader_is_waited_out_never_before_the_lease() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let leader = candidate(&a, "pod-a", LockKind::Lease, &journal).await;
    settled_leader(std::slice::from_ref(&leader)).await;
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast_timing());
    let follower = candidate(&b, "pod-b", LockKind::Lease, &journal).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!follower.campaign.is_leader());

    // The last renewal the follower's broker could have seen happened before the kill.
    let killed = Instant::now();
    a.kill();
    let mut state = follower.campaign.state();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.is_leader))
        .await
        .expect("follower takes over")
        .unwrap();
    let took = killed.elapsed();
    // Never before the lease (2 s) minus at most one retry period since the last renewal.
    assert!(
        took >= Duration::from_millis(1750),
        "took over after only {took:?}"
    );
    assert!(took <= Duration::from_millis(2000 + 250 + 1500), "took {took:?}");
    drop(leader);
}

/// The lease's `renewTime` minus the local wall clock.
async fn renew_time_offset(server: &TestApiServer) -> chrono::TimeDelta {
    let client = server.client(server.admin()).await.unwrap();
    let leases: kube::Api<Lease> = kube::Api::namespaced(client, "demo");
    let lease = leases.get("shared-job").await.unwrap();
    let renewed = lease.spec.and_then(|s| s.renew_time).expect("renewTime").0;
    chrono::TimeDelta::seconds(renewed.as_second() - chrono::Utc::now().timestamp())
}

/// `leader` (on `broker`) keeps the lock from `follower` for two leases; once `broker` is killed,
/// `follower` takes over after the lease (less at most one retry period since the last renewal
/// it saw): not at once, and not an hour later. Lease 2 s, as in [`fast_timing`].
async fn held_then_waited_out(leader: &Candidate, broker: TestBroker, follower: &Candidate) {
    let lease = Duration::from_secs(2);
    tokio::time::sleep(2 * lease).await;
    assert!(leader.campaign.is_leader() && !follower.campaign.is_leader());
    let killed = Instant::now();
    broker.kill();
    let mut state = follower.campaign.state();
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.is_leader))
        .await
        .unwrap_or_else(|_| panic!("{} never took over", follower.name))
        .unwrap();
    let took = killed.elapsed();
    assert!(
        took >= lease - Duration::from_millis(250) && took <= lease + Duration::from_secs(2),
        "{} took over after {took:?}",
        follower.name
    );
}

/// Brokers whose wall clocks are an hour apart write records that look an hour stale (or an
/// hour fresh) to each other. Neither matters: expiry is judged on each broker's monotonic
/// clock from when it saw the record change, so a follower neither steals a lease that is being
/// renewed nor waits an hour for one that is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_wall_clocks_neither_steal_nor_stall() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let hour = chrono::TimeDelta::hours(1);
    let skewed = |wall_clock_skew| Defaults {
        timing: fast_timing(),
        wall_clock_skew,
    };
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), skewed(-hour));
    let pod_a = candidate(&a, "pod-a", LockKind::Lease, &journal).await;
    settled_leader(std::slice::from_ref(&pod_a)).await;
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), skewed(hour));
    let pod_b = candidate(&b, "pod-b", LockKind::Lease, &journal).await;

    // node-a's renewals look an hour old...
    let offset = renew_time_offset(&server).await;
    assert!(
        offset < -hour + chrono::TimeDelta::minutes(1),
        "renewTime is {offset} off"
    );
    // ...yet node-b, an hour ahead, does not take over while node-a renews, and does once
    // node-a is gone.
    held_then_waited_out(&pod_a, a, &pod_b).await;

    // Now the records are an hour ahead; node-c, an hour behind, neither steals nor stalls.
    let offset = renew_time_offset(&server).await;
    assert!(
        offset > hour - chrono::TimeDelta::minutes(1),
        "renewTime is {offset} off"
    );
    let (c, _) = TestBroker::on_server(&server, "node-c", dir.path(), skewed(-hour));
    let pod_c = candidate(&c, "pod-c", LockKind::Lease, &journal).await;
    held_then_waited_out(&pod_b, b, &pod_c).await;
    // Each was elected once, in turn (the journal may trail the state by a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let elected: Vec<_> = journal
            .all()
            .into_iter()
            .filter(|(_, _, e)| matches!(e, CampaignEvent::Elected { .. }))
            .map(|(_, who, _)| who)
            .collect();
        if elected.len() == 3 || Instant::now() > deadline {
            assert_eq!(elected, ["pod-a", "pod-b", "pod-c"]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared oracle of the partition scenarios: node-a's `pod-a` leads, node-b's `pod-b`
/// waits; `fault` cuts node-a off from the API (how is up to the scenario). Then `pod-a` must
/// be told `lost` (renew_failed) within `lost_within` of the cut, and before `pod-b` is elected.
async fn leader_cut_off<F, Fut>(lock: LockKind, lost_within: Duration, fault: F)
where
    F: FnOnce(Arc<TestApiServer>, elector_tests::kube_api::User) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = Arc::new(TestApiServer::start().await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let (a, user_a) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let leader = candidate(&a, "pod-a", lock, &journal).await;
    settled_leader(std::slice::from_ref(&leader)).await;
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast_timing());
    let _follower = candidate(&b, "pod-b", lock, &journal).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cut = Instant::now();
    fault(server.clone(), user_a.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while journal.elected_after(cut).is_empty() {
        assert!(Instant::now() < deadline, "nobody took over: {:?}", journal.all());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (lost_at, reason) = journal.lost_of("pod-a").expect("the cut-off leader was told");
    assert_eq!(reason, LostReason::RenewFailed);
    let (new_at, who) = journal.elected_after(cut)[0].clone();
    assert_eq!(who, "pod-b");
    assert!(
        lost_at < new_at,
        "lost at {:?}, new leader at {:?}",
        lost_at - cut,
        new_at - cut
    );
    assert!(lost_at - cut <= lost_within, "lost after {:?}", lost_at - cut);
    assert!(!leader.campaign.is_leader());
    server.faults(&user_a).clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_is_told_lost_before_anyone_else_leads() {
    // The last success was at most one retry period (250 ms) before the cut; deadline 1.5 s.
    leader_cut_off(
        LockKind::Endpoints,
        Duration::from_millis(1500 + 300),
        |server, user| async move {
            server.faults(&user).partition(true);
        },
    )
    .await;
}

/// A 429 with `Retry-After: 1` delays the next renewal; that renewal then hangs in a partition.
/// The leader must still be told `lost` at its renew deadline (counted from its last successful
/// renewal), not when the hanging request finally times out, and before the other node leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_at_the_deadline_even_while_a_delayed_renewal_hangs() {
    leader_cut_off(
        LockKind::Lease,
        Duration::from_millis(1500 + 400),
        |server, user| async move {
            server.faults(&user).errors(
                1.0,
                InjectedError::TooManyRequests {
                    retry_after_seconds: 1,
                },
            );
            tokio::time::sleep(Duration::from_millis(400)).await;
            server.faults(&user).clear();
            server.faults(&user).partition(true);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_one_write_per_retry_period_and_no_follower_reads() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast_timing());
    let (c, _) = TestBroker::on_server(&server, "node-c", dir.path(), fast_timing());
    let cands = vec![
        candidate(&a, "pod-0-0", LockKind::Lease, &journal).await,
        candidate(&b, "pod-1-0", LockKind::Lease, &journal).await,
        candidate(&c, "pod-2-0", LockKind::Lease, &journal).await,
    ];
    let (leader, _) = settled_leader(&cands).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.clear_requests();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let log = server.requests();
    let leader_user = format!("node-{}", ["a", "b", "c"][(leader.as_bytes()[4] - b'0') as usize]);
    let writes = log
        .iter()
        .filter(|r| r.is_write() && r.user == leader_user)
        .count();
    let max = (window.as_secs_f64() / 0.25).ceil() as usize + 1;
    assert!(
        writes >= 6 && writes <= max,
        "{writes} writes in {window:?} (at most {max})"
    );
    let follower_calls: Vec<_> = log
        .iter()
        .filter(|r| r.user != leader_user && r.verb != "watch")
        .map(|r| format!("{} {} {}", r.user, r.verb, r.path))
        .collect();
    assert!(follower_calls.is_empty(), "followers polled: {follower_calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_go_records_are_honoured() {
    let records: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/kube-api-transcripts/client-go-records.json"
        ))
        .or_else(|_| {
            std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/kube-api-transcripts/client-go-records.json"
            ))
        })
        .unwrap(),
    )
    .unwrap();
    let server = TestApiServer::start().await.unwrap();
    let admin = server.client(server.admin()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::default();
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(admin.clone(), "default");
    // client-go holds the Lease (its record byte for byte, with a 3 s lease to keep the test short).
    let mut held: k8s_openapi::api::coordination::v1::Lease =
        serde_json::from_value(records["objects"]["lease-held"].clone()).unwrap();
    held.metadata.resource_version = None;
    held.metadata.uid = None;
    held.metadata.creation_timestamp = None;
    held.spec.as_mut().unwrap().lease_duration_seconds = Some(3);
    api.create(&Default::default(), &held).await.unwrap();

    let (b, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let client = Client::connect(&b.socket).await.unwrap();
    let campaign = client
        .campaign(
            CampaignOptions::new("cg-lease", "pod-x")
                .namespace("default")
                .timing(TIMING),
        )
        .await
        .unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        campaign.state().borrow().leader.as_deref(),
        Some("client-go-a"),
        "the client-go holder is shown"
    );
    let mut state = campaign.state();
    tokio::time::timeout(Duration::from_secs(8), state.wait_for(|s| s.is_leader))
        .await
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "a client-go lease is held until it expires"
    );
    let ours = api.get("cg-lease").await.unwrap();
    let spec = ours.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-x"));
    assert_eq!(spec.lease_transitions, Some(1));
    campaign.resign().await.unwrap();
    // The release is written right after the resign is answered.
    let mut released = api.get("cg-lease").await.unwrap().spec.unwrap();
    for _ in 0..50 {
        if released.holder_identity.as_deref() == Some("") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        released = api.get("cg-lease").await.unwrap().spec.unwrap();
    }
    assert_eq!(
        (
            released.holder_identity.as_deref(),
            released.lease_duration_seconds
        ),
        (Some(""), Some(1))
    );

    // An Endpoints lock client-go released is taken at once.
    let eps: kube::Api<k8s_openapi::api::core::v1::Endpoints> = kube::Api::namespaced(admin, "default");
    let mut rel: k8s_openapi::api::core::v1::Endpoints =
        serde_json::from_value(records["objects"]["ep-released"].clone()).unwrap();
    rel.metadata.resource_version = None;
    rel.metadata.uid = None;
    eps.create(&Default::default(), &rel).await.unwrap();
    let t = Instant::now();
    let c2 = client
        .campaign(
            CampaignOptions::new("cg-endpoints", "pod-y")
                .namespace("default")
                .lock(LockKind::Endpoints)
                .timing(TIMING),
        )
        .await
        .unwrap();
    c2.elected().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "released record taken after {:?}",
        t.elapsed()
    );
    let ep = eps.get("cg-endpoints").await.unwrap();
    let ann = &ep.metadata.annotations.unwrap()["control-plane.alpha.kubernetes.io/leader"];
    let v: serde_json::Value = serde_json::from_str(ann).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "acquireTime",
            "holderIdentity",
            "leaderTransitions",
            "leaseDurationSeconds",
            "renewTime"
        ]
    );
    assert!(
        ann.starts_with(r#"{"holderIdentity":"pod-y","leaseDurationSeconds":2,"acquireTime":""#),
        "{ann}"
    );
    drop(journal);
}
