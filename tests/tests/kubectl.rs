//! `kubectl` (client-go) against the test API server while a broker holds locks: what an
//! operator sees of elector's lock objects, and what happens when they delete one.
//!
//! Needs `kubectl` on the PATH (`.ci/run` installs Debian's `kubernetes-client` if it is missing).

use std::time::Duration;

use elector_client::protocol::LockKind;
use elector_client::{CampaignEvent, CampaignOptions, Client};
use elector_tests::harness::{TestBroker, fast_timing};
use elector_tests::kube_api::{Rule, TestApiServer};
use futures::StreamExt;

use elector_tests::kubectl;

/// The holder of Lease `demo/job`, as `kubectl` shows it.
async fn lease_holder(kubeconfig: &std::path::Path) -> String {
    kubectl(
        kubeconfig,
        &[
            "-n",
            "demo",
            "get",
            "lease",
            "job",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_elector_locks_and_a_deleted_lock_is_retaken() {
    let server = TestApiServer::start().await.unwrap();
    let anonymous = server.add_anonymous(vec![Rule::all()]);
    let kc = server.kubeconfig_path(&anonymous);
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let client = Client::connect(&broker.socket).await.unwrap();
    let mut job = client
        .campaign(
            CampaignOptions::new("job", "pod-a")
                .namespace("demo")
                .lock(LockKind::Lease),
        )
        .await
        .unwrap();
    let web = client
        .campaign(
            CampaignOptions::new("web", "pod-a")
                .namespace("demo")
                .lock(LockKind::Endpoints),
        )
        .await
        .unwrap();
    let first_term = job.elected().await.unwrap();
    web.elected().await.unwrap();

    // What an operator sees.
    assert_eq!(lease_holder(&kc).await, "pod-a");
    let record = kubectl(
        &kc,
        &[
            "-n",
            "demo",
            "get",
            "endpoints",
            "web",
            "-o",
            r"jsonpath={.metadata.annotations.control-plane\.alpha\.kubernetes\.io/leader}",
        ],
    )
    .await;
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["holderIdentity"], "pod-a");
    let listed = kubectl(&kc, &["get", "leases,endpoints", "-A"]).await;
    assert!(listed.contains("job") && listed.contains("web"), "{listed}");

    // An operator deletes the Lease: its holder is told `lost` (nobody holds a lock that is
    // gone), and the election goes on: the broker creates it again and pod-a leads anew.
    let mut events = job.events();
    kubectl(&kc, &["-n", "demo", "delete", "lease", "job"]).await;
    let lost = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if let CampaignEvent::Lost { .. } = e {
                return e;
            }
        }
        panic!("events ended");
    })
    .await
    .expect("pod-a is told it lost the deleted lock");
    assert!(matches!(lost, CampaignEvent::Lost { .. }));
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            if let CampaignEvent::Elected { term } = e {
                return term;
            }
        }
        panic!("events ended");
    })
    .await
    .expect("pod-a leads again");
    assert!(again > first_term, "term {again} after {first_term}");
    assert_eq!(lease_holder(&kc).await, "pod-a");
}
