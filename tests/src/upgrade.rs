//! Helpers of the rolling-upgrade and socket-reclaim tests: campaigns journaled by identity,
//! a two-leader oracle over the candidates' own views, and the Leases as the API server has
//! them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elector_client::protocol::Timing;
use elector_client::{Campaign, CampaignEvent, CampaignOptions, Client, LeadershipState};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::RawClient;
use crate::kube_api::TestApiServer;

/// Renew deadline 4 s: room for a loaded CI machine.
pub const TIMING: Timing = Timing {
    lease_duration: Some(6),
    renew_deadline: Some(4.0),
    retry_period: Some(0.5),
};

/// Every campaign event, when it came and to whom.
pub type Journal = Arc<Mutex<Vec<(Instant, String, CampaignEvent)>>>;

/// A campaign whose events go to `journal`, tagged with its identity.
pub async fn campaign(client: &Client, election: &str, identity: &str, journal: &Journal) -> Campaign {
    let mut campaign = client
        .campaign(CampaignOptions::new(election, identity).timing(TIMING))
        .await
        .expect("campaign");
    let mut events = campaign.events();
    let (journal, who) = (journal.clone(), identity.to_string());
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            journal.lock().unwrap().push((Instant::now(), who.clone(), e));
        }
    });
    campaign
}

/// Watches every candidate's own view (a leader in jeopardy counts as leading until its
/// guarantee, as its app does) every millisecond; returns, when stopped, how many samples were
/// taken and every instant at which an election had two leaders.
pub fn two_leader_oracle(
    candidates: Vec<(String, String, watch::Receiver<LeadershipState>)>,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let (mut samples, mut violations) = (0, Vec::new());
        while !stopped.load(Ordering::Relaxed) {
            let mut leading: HashMap<&str, Vec<&str>> = HashMap::new();
            for (election, identity, state) in &candidates {
                if state.borrow().is_leader {
                    leading.entry(election).or_default().push(identity);
                }
            }
            for (election, who) in leading {
                if who.len() > 1 {
                    violations.push(format!("{election}: {who:?} lead at once"));
                }
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (samples, violations)
    });
    (stop, task)
}

pub async fn lease(server: &TestApiServer, name: &str) -> Lease {
    let admin = server.client(server.admin()).await.unwrap();
    kube::Api::<Lease>::namespaced(admin, "default")
        .get(name)
        .await
        .unwrap()
}

pub fn holder_and_term(l: &Lease) -> (String, i32) {
    let spec = l.spec.as_ref().expect("spec");
    (
        spec.holder_identity.clone().unwrap_or_default(),
        spec.lease_transitions.unwrap_or(0),
    )
}

pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects once the broker serves `socket` (a fresh process binds it soon after starting).
pub async fn open_when_up(socket: &Path) -> RawClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = RawClient::try_open(socket).await {
            return c;
        }
        assert!(Instant::now() < deadline, "no broker on {}", socket.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
