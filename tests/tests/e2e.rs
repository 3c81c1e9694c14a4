//! Opt-in end-to-end scenarios against a real cluster: set `ELECTOR_E2E_KUBECONFIG` (and
//! optionally `ELECTOR_E2E_NAMESPACE`, default `default`). Brokers run as local "nodes" (each on
//! its own runtime) against that API server; applications use elector-client over the socket.
//! Without the variable every test prints why it did nothing and passes.
//!
//! The user needs get/list/watch/create/update/delete on leases and endpoints in the namespace.
//! Objects are named `elector-e2e-<random>` and deleted at the end.
//!
//! This suite also runs here against the test API server:
//! `cargo run -p elector-tests --bin test-apiserver` then
//! `ELECTOR_E2E_KUBECONFIG=<printed kubeconfig> cargo nextest run -p elector-tests --test e2e`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use elector_broker::election::ElectionTiming;
use elector_client::protocol::{LockKind, Timing};
use elector_client::{CampaignOptions, Client};
use elector_tests::harness::{Backend, TestBroker};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Endpoints;
use kube::Api;

struct Cluster {
    kubeconfig: PathBuf,
    namespace: String,
    client: kube::Client,
    prefix: String,
}

async fn cluster(test: &str) -> Option<Cluster> {
    let Some(path) = std::env::var_os("ELECTOR_E2E_KUBECONFIG") else {
        println!("{test}: ELECTOR_E2E_KUBECONFIG is not set; skipping the real-cluster scenario");
        return None;
    };
    let kubeconfig = PathBuf::from(path);
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kube config");
    Some(Cluster {
        kubeconfig,
        namespace: std::env::var("ELECTOR_E2E_NAMESPACE").unwrap_or_else(|_| "default".into()),
        client: kube::Client::try_from(config).expect("kube client"),
        prefix: format!("elector-e2e-{:08x}", rand::random::<u32>()),
    })
}

/// Lease 3 s, deadline 2 s, retry 0.5 s: short enough for a test, long enough for a real API
/// server's latency.
const TIMING: Timing = Timing {
    lease_duration: Some(3),
    renew_deadline: Some(2.0),
    retry_period: Some(0.5),
};

fn broker_timing() -> ElectionTiming {
    ElectionTiming::new(
        Duration::from_secs(3),
        Duration::from_secs(2),
        Duration::from_millis(500),
    )
    .unwrap()
}

impl Cluster {
    fn broker(&self, node: &str, dir: &std::path::Path) -> TestBroker {
        TestBroker::start(
            node,
            dir,
            Backend::Kube(self.kubeconfig.clone()),
            broker_timing(),
            false,
        )
    }

    async fn campaign(
        &self,
        b: &TestBroker,
        election: &str,
        who: &str,
        lock: LockKind,
    ) -> (Client, elector_client::Campaign) {
        let c = Client::connect(&b.socket).await.unwrap();
        let camp = c
            .campaign(
                CampaignOptions::new(election, who)
                    .namespace(&self.namespace)
                    .lock(lock)
                    .timing(TIMING),
            )
            .await
            .unwrap();
        (c, camp)
    }

    async fn cleanup(&self, names: &[String]) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let eps: Api<Endpoints> = Api::namespaced(self.client.clone(), &self.namespace);
        for n in names {
            let _ = leases.delete(n, &Default::default()).await;
            let _ = eps.delete(n, &Default::default()).await;
        }
    }
}

async fn elected_within(c: &elector_client::Campaign, limit: Duration) -> Duration {
    let t = Instant::now();
    tokio::time::timeout(limit, c.elected())
        .await
        .expect("elected in time")
        .unwrap();
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_failover() {
    let Some(k) = cluster("e2e_failover").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        k.broker("e2e-node-a", dir.path()),
        k.broker("e2e-node-b", dir.path()),
    );
    let mut names = Vec::new();
    for lock in [LockKind::Lease, LockKind::Endpoints] {
        let election = format!("{}-{}", k.prefix, lock.as_str());
        names.push(election.clone());
        let (_ca, leader) = k.campaign(&a, &election, "pod-a", lock).await;
        elected_within(&leader, Duration::from_secs(10)).await;
        let (_cb, follower) = k.campaign(&b, &election, "pod-b", lock).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!follower.is_leader());
        // The app exits: the other node leads at once (release, then its watch).
        let t = Instant::now();
        leader.resign().await.unwrap();
        follower.elected().await.unwrap();
        let took = t.elapsed();
        println!("e2e {lock}: cross-node failover after the app exited: {took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    // The leading broker dies without releasing: the other waits out the lease, never less.
    let election = format!("{}-crash", k.prefix);
    names.push(election.clone());
    let c = k.broker("e2e-node-c", dir.path());
    let (_cc, leader) = k.campaign(&c, &election, "pod-c", LockKind::Lease).await;
    elected_within(&leader, Duration::from_secs(10)).await;
    let (_cb, follower) = k.campaign(&b, &election, "pod-b2", LockKind::Lease).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    c.kill();
    let took = elected_within(&follower, Duration::from_secs(15)).await;
    println!("e2e: takeover after the leading broker died: {took:?} (lease 3 s)");
    assert!(
        took >= Duration::from_millis(2500),
        "took over after only {:?}",
        t.elapsed()
    );
    drop((a, b));
    k.cleanup(&names).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_interop_with_client_go_records() {
    let Some(k) = cluster("e2e_interop_with_client_go_records").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let leases: Api<Lease> = Api::namespaced(k.client.clone(), &k.namespace);
    let name = format!("{}-cg", k.prefix);
    // A Lease held by a client-go elector (its record shape), 4 s.
    let now = k8s_openapi::jiff::Timestamp::now();
    let held: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": "client-go-x", "leaseDurationSeconds": 4, "leaseTransitions": 0,
                 "acquireTime": now.to_string(), "renewTime": now.to_string()}
    }))
    .unwrap();
    leases.create(&Default::default(), &held).await.unwrap();
    let a = k.broker("e2e-interop", dir.path());
    let (_c, camp) = k.campaign(&a, &name, "pod-x", LockKind::Lease).await;
    let took = elected_within(&camp, Duration::from_secs(15)).await;
    assert!(
        took >= Duration::from_millis(3500),
        "a client-go lease must be honoured until it expires: {took:?}"
    );
    let spec = leases.get(&name).await.unwrap().spec.unwrap();
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_transitions),
        (Some("pod-x"), Some(1))
    );
    camp.resign().await.unwrap();
    // The release is written right after the resign is answered.
    let mut spec = leases.get(&name).await.unwrap().spec.unwrap();
    for _ in 0..50 {
        if spec.holder_identity.as_deref() == Some("") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        spec = leases.get(&name).await.unwrap().spec.unwrap();
    }
    assert_eq!(
        (spec.holder_identity.as_deref(), spec.lease_duration_seconds),
        (Some(""), Some(1)),
        "released as client-go does"
    );
    drop(a);
    k.cleanup(&[name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_shutdown_releases() {
    let Some(k) = cluster("e2e_shutdown_releases").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}-shutdown", k.prefix);
    let (a, b) = (k.broker("e2e-sd-a", dir.path()), k.broker("e2e-sd-b", dir.path()));
    let (_ca, leader) = k.campaign(&a, &name, "pod-a", LockKind::Endpoints).await;
    elected_within(&leader, Duration::from_secs(10)).await;
    let (_cb, follower) = k.campaign(&b, &name, "pod-b", LockKind::Endpoints).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    a.shutdown();
    follower.elected().await.unwrap();
    println!(
        "e2e: takeover after the leading broker's SIGTERM-style shutdown: {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown must release: {:?}",
        t.elapsed()
    );
    assert!(!leader.is_leader());
    drop(b);
    k.cleanup(&[name]).await;
}
