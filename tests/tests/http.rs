//! The broker's HTTP endpoints: /healthz, /readyz, /metrics through a failover, /elections.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use elector_broker::daemon::Readiness;
use elector_broker::election::ElectionTiming;
use elector_client::protocol::LockKind;
use elector_client::{CampaignOptions, Client};
use elector_tests::RawClient;
use elector_tests::harness::{TestBroker, fast_timing};
use elector_tests::http_get;
use elector_tests::kube_api::TestApiServer;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_metrics_through_a_failover() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), fast_timing());
    let (b, _) = TestBroker::on_server(&server, "node-b", dir.path(), fast_timing());
    let (ha, hb) = (a.http_addr.unwrap(), b.http_addr.unwrap());
    assert_eq!(http_get(ha, "/healthz").await.unwrap().0, 200);

    let ca = Client::connect(&a.socket).await.unwrap();
    let leader = ca
        .campaign(
            CampaignOptions::new("web", "pod-a")
                .namespace("demo")
                .lock(LockKind::Endpoints),
        )
        .await
        .unwrap();
    leader.elected().await.unwrap();
    let cb = Client::connect(&b.socket).await.unwrap();
    let standby = cb
        .campaign(
            CampaignOptions::new("web", "pod-b")
                .namespace("demo")
                .lock(LockKind::Endpoints),
        )
        .await
        .unwrap();
    let _observer = cb
        .observe("web", Some("demo"), LockKind::Endpoints)
        .await
        .unwrap();

    let (status, body) = http_get(ha, "/elections").await.unwrap();
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let e = &info[0];
    assert_eq!(
        (e["election"].clone(), e["namespace"].clone(), e["lock"].clone()),
        ("web".into(), "demo".into(), "endpoints".into())
    );
    assert_eq!(
        (e["leader"].clone(), e["held_by_this_broker"].clone()),
        ("pod-a".into(), true.into())
    );
    assert_eq!(e["candidates"][0]["identity"], "pod-a");
    assert!(e["last_renew"].is_string());
    let (_, body) = http_get(hb, "/elections").await.unwrap();
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info[0]["leader"].clone(), info[0]["observers"].clone()),
        ("pod-a".into(), 1.into())
    );

    let (status, before) = http_get(hb, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&before, "elector_elections_held"), 0.0);
    assert_eq!(metric(&before, "elector_candidates"), 1.0);
    assert_eq!(metric(&before, "elector_observers"), 1.0);
    assert_eq!(metric(&before, "elector_connected_clients"), 1.0);
    let (_, a_metrics) = http_get(ha, "/metrics").await.unwrap();
    assert!(
        metric(
            &a_metrics,
            "elector_api_requests_total{verb=\"create\",resource=\"endpoints\",code=\"2xx\"}"
        ) == 1.0,
        "{a_metrics}"
    );
    assert!(a_metrics.contains("elector_api_request_duration_seconds_bucket"));

    // Fail over: node-a's app resigns; node-b takes over at once and its metrics show it.
    leader.resign().await.unwrap();
    standby.elected().await.unwrap();
    let (_, after) = http_get(hb, "/metrics").await.unwrap();
    assert_eq!(metric(&after, "elector_elections_held"), 1.0);
    assert_eq!(metric(&after, "elector_leadership_transitions_total"), 1.0);
    assert!(metric(&after, "elector_events_sent_total") > metric(&before, "elector_events_sent_total"));

    // Bad requests are counted by code.
    let mut raw = RawClient::open(&b.socket).await;
    raw.send_raw(b"{\"op\":\"nope\"}\n").await;
    // The error reply comes after the metric is counted.
    assert_eq!(raw.error_code().await, "unknown_op");
    let (_, m) = http_get(hb, "/metrics").await.unwrap();
    assert_eq!(
        metric(&m, "elector_rejected_requests_total{code=\"unknown_op\"}"),
        1.0,
        "{m}"
    );
}

/// `last_renew` in /elections: when the last renewal that succeeded was sent, not the last one
/// sent. While the API hangs, renewals are sent and get no answer: it stays before the hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_renew_is_the_last_successful_renewal() {
    async fn last_renew(http: std::net::SocketAddr) -> Option<SystemTime> {
        let (_, body) = http_get(http, "/elections").await.unwrap();
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        let at = info[0]["last_renew"].as_str()?;
        Some(chrono::DateTime::parse_from_rfc3339(at).unwrap().into())
    }
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A renewal every 0.5 s; a hang of 2 s is far from the 8 s renew deadline.
    let timing = ElectionTiming::new(
        Duration::from_secs(10),
        Duration::from_secs(8),
        Duration::from_millis(500),
    )
    .unwrap();
    let (a, _) = TestBroker::on_server(&server, "node-a", dir.path(), timing);
    let http = a.http_addr.unwrap();
    let client = Client::connect(&a.socket).await.unwrap();
    let leader = client
        .campaign(CampaignOptions::new("job", "pod-a"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), leader.elected())
        .await
        .unwrap()
        .unwrap();
    // Renewed (the acquisition counts too).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while last_renew(http).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no last_renew while leading"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let hang_from = SystemTime::now();
    server.pause(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = last_renew(http).await.expect("still leading");
    server.pause(false);
    assert!(leader.is_leader());
    assert!(
        during <= hang_from,
        "last_renew {during:?} moved during the hang (from {hang_from:?}): it was stamped when sent"
    );

    // Renewals succeed again: it moves on.
    let resumed = SystemTime::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while last_renew(http).await.is_none_or(|t| t < resumed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "last_renew never moved after the hang"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn readiness_follows_api_contact() {
    assert!(Readiness::standalone().check().is_ok());
    let r = Arc::new(Readiness::kubernetes(Duration::from_millis(100)));
    assert!(r.check().unwrap_err().to_string().contains("not answered yet"));
    r.api_contact();
    assert!(r.check().is_ok());
    std::thread::sleep(Duration::from_millis(150));
    assert!(r.check().unwrap_err().to_string().contains("last answered"));
}
