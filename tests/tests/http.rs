//! The broker's HTTP endpoints: /healthz, /readyz, /metrics through a failover, /elections.

use std::sync::Arc;
use std::time::Duration;

use elector_broker::daemon::Readiness;
use elector_client::protocol::LockKind;
use elector_client::{CampaignOptions, Client};
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
    let mut raw = tokio::net::UnixStream::connect(&b.socket).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"{\"op\":\"nope\"}\n")
        .await
        .unwrap();
    // The error reply comes after the metric is counted.
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(&mut raw));
    let hello = lines.next_line().await.unwrap().unwrap();
    assert!(hello.contains("hello"), "{hello}");
    let reply = lines.next_line().await.unwrap().unwrap();
    assert!(reply.contains("unknown_op"), "{reply}");
    let (_, m) = http_get(hb, "/metrics").await.unwrap();
    assert_eq!(
        metric(&m, "elector_rejected_requests_total{code=\"unknown_op\"}"),
        1.0,
        "{m}"
    );
}

#[test]
fn readiness_follows_api_contact() {
    assert!(Readiness::standalone().check().is_ok());
    let r = Arc::new(Readiness::kubernetes(Duration::from_millis(100)));
    assert!(r.check().unwrap_err().contains("not answered yet"));
    r.api_contact();
    assert!(r.check().is_ok());
    std::thread::sleep(Duration::from_millis(150));
    assert!(r.check().unwrap_err().contains("last answered"));
}
