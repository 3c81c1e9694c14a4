//! The test API server counts the events it delivers on each watch, exactly: per user, per
//! watch request (resource, namespace, field selector) and per object name, as the watching
//! client receives them.

use std::collections::HashMap;
use std::time::Duration;

use elector_tests::kube_api::{Rule, TestApiServer, WatchStats};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};

fn lease(name: &str, holder: &str) -> Lease {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder},
    }))
    .unwrap()
}

/// Reads `n` events (not bookmarks) from a watch, then returns the names they were about.
async fn read_events(
    stream: &mut futures::stream::BoxStream<'static, kube::Result<WatchEvent<Lease>>>,
    n: usize,
) -> Vec<String> {
    let mut names = Vec::new();
    while names.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.try_next())
            .await
            .expect("an event within 20 s")
            .expect("watch ok")
            .expect("watch open");
        match event {
            WatchEvent::Added(l) | WatchEvent::Modified(l) | WatchEvent::Deleted(l) => {
                names.push(l.metadata.name.unwrap_or_default())
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    names
}

fn by_name(names: &[String]) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

fn find<'a>(stats: &'a [WatchStats], user: &str, ns: &str, field: Option<&str>) -> &'a WatchStats {
    stats
        .iter()
        .find(|s| {
            s.user == user && s.namespace.as_deref() == Some(ns) && s.field_selector.as_deref() == field
        })
        .unwrap_or_else(|| panic!("no watch of {user} on {ns} {field:?} in {stats:#?}"))
}

#[tokio::test]
async fn delivered_watch_events_are_counted_exactly_per_watch_and_name() {
    let server = TestApiServer::start().await.unwrap();
    let alice = server.add_user("alice", vec![Rule::all()]);
    let bob = server.add_user("bob", vec![Rule::all()]);
    let admin = server.client(server.admin()).await.unwrap();
    let a_client = server.client(&alice).await.unwrap();
    let b_client = server.client(&bob).await.unwrap();
    let ns1: Api<Lease> = Api::namespaced(admin.clone(), "default");
    let ns2: Api<Lease> = Api::namespaced(admin.clone(), "other");
    server.create_namespace("other", &[]).await.unwrap();
    // One lease exists before the watches start: a watch from "0" lists it as ADDED.
    ns1.create(&PostParams::default(), &lease("a", "x"))
        .await
        .unwrap();

    let wp = WatchParams::default();
    let mut whole = Api::<Lease>::namespaced(a_client.clone(), "default")
        .watch(&wp, "0")
        .await
        .unwrap()
        .boxed();
    let mut one = Api::<Lease>::namespaced(b_client.clone(), "default")
        .watch(&WatchParams::default().fields("metadata.name=a"), "0")
        .await
        .unwrap()
        .boxed();
    let mut other = Api::<Lease>::namespaced(a_client.clone(), "other")
        .watch(&wp, "0")
        .await
        .unwrap()
        .boxed();
    // Wait until all three watches are streaming.
    tokio::time::timeout(Duration::from_secs(20), async {
        while server.watch_stats().iter().filter(|s| s.open).count() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();

    ns1.create(&PostParams::default(), &lease("b", "x"))
        .await
        .unwrap();
    ns2.create(&PostParams::default(), &lease("c", "x"))
        .await
        .unwrap();
    for holder in ["y", "z"] {
        let mut l = ns1.get("a").await.unwrap();
        l.spec.as_mut().unwrap().holder_identity = Some(holder.into());
        ns1.replace("a", &PostParams::default(), &l).await.unwrap();
    }
    let mut b = ns1.get("b").await.unwrap();
    b.spec.as_mut().unwrap().holder_identity = Some("y".into());
    ns1.replace("b", &PostParams::default(), &b).await.unwrap();

    // What each client received.
    let whole_names = read_events(&mut whole, 5).await; // ADDED a, ADDED b, MODIFIED a ×2, MODIFIED b
    let one_names = read_events(&mut one, 3).await; // ADDED a, MODIFIED a ×2
    let other_names = read_events(&mut other, 1).await; // ADDED c
    tokio::time::sleep(Duration::from_millis(300)).await; // nothing more is counted

    let stats = server.watch_stats();
    let w = find(&stats, "alice", "default", None);
    assert_eq!(w.resource, "leases");
    assert_eq!(w.events, 5);
    assert_eq!(w.events_by_name, by_name(&whole_names));
    assert_eq!(
        w.events_by_name,
        HashMap::from([("a".into(), 3), ("b".into(), 2)])
    );
    let o = find(&stats, "bob", "default", Some("metadata.name=a"));
    assert_eq!(o.events, 3);
    assert_eq!(o.events_by_name, by_name(&one_names));
    assert_eq!(o.events_by_name, HashMap::from([("a".into(), 3)]));
    let x = find(&stats, "alice", "other", None);
    assert_eq!(x.events, 1);
    assert_eq!(x.events_by_name, by_name(&other_names));
    assert_eq!(stats.len(), 3);

    // A reset zeroes open watches' counts; counting goes on from there.
    server.reset_watch_stats();
    assert!(
        server
            .watch_stats()
            .iter()
            .all(|s| s.events == 0 && s.events_by_name.is_empty())
    );
    let mut l = ns2.get("c").await.unwrap();
    l.spec.as_mut().unwrap().holder_identity = Some("y".into());
    ns2.replace("c", &PostParams::default(), &l).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while server.watch_stats().iter().all(|s| s.events == 0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let stats = server.watch_stats();
    assert_eq!(find(&stats, "alice", "other", None).events, 1);
    assert_eq!(stats.iter().map(|s| s.events).sum::<u64>(), 1);
    assert_eq!(read_events(&mut other, 1).await, vec!["c".to_string()]);

    // A watch whose client goes away is marked closed, and a reset forgets it.
    drop(whole);
    tokio::time::timeout(Duration::from_secs(20), async {
        while find(&server.watch_stats(), "alice", "default", None).open {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    server.reset_watch_stats();
    assert_eq!(server.watch_stats().len(), 2);
    drop((one, other));
}

/// Through a broker on the test API server: with few elections in a namespace it watches each
/// lock by name (and is sent nothing about other locks there); with more than 16 in one
/// namespace it watches that namespace instead, and its watches by name there end.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_watches_few_locks_by_name_and_many_by_namespace() {
    use elector_broker::election::ElectionTiming;
    use elector_client::{CampaignOptions, Client};
    use elector_tests::harness::TestBroker;

    let server = TestApiServer::start().await.unwrap();
    server.create_namespace("many", &[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = TestBroker::on_server(&server, "node-a", dir.path(), ElectionTiming::default());
    let client = Client::connect(&broker.socket).await.unwrap();
    let mut campaigns = Vec::new();
    for i in 0..3 {
        campaigns.push(
            client
                .campaign(CampaignOptions::new(format!("few-{i}"), "app"))
                .await
                .unwrap(),
        );
    }
    let all_lead = |c: &[elector_client::Campaign]| c.iter().all(|c| c.is_leader());
    tokio::time::timeout(Duration::from_secs(30), async {
        while !all_lead(&campaigns) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every campaign leads");
    // Someone else's lock in the same namespace, written after the broker's watches started.
    let admin: Api<Lease> = Api::namespaced(server.client(server.admin()).await.unwrap(), "default");
    admin
        .create(&PostParams::default(), &lease("stranger", "x"))
        .await
        .unwrap();
    for holder in ["y", "z"] {
        let mut l = admin.get("stranger").await.unwrap();
        l.spec.as_mut().unwrap().holder_identity = Some(holder.into());
        admin
            .replace("stranger", &PostParams::default(), &l)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open_of = |ns: &str| -> Vec<WatchStats> {
        server
            .watch_stats()
            .into_iter()
            .filter(|s| s.user == "node-a" && s.open && s.namespace.as_deref() == Some(ns))
            .collect()
    };
    let mut selectors: Vec<_> = open_of("default").into_iter().map(|s| s.field_selector).collect();
    selectors.sort();
    assert_eq!(
        selectors,
        (0..3)
            .map(|i| Some(format!("metadata.name=few-{i}")))
            .collect::<Vec<_>>()
    );
    let stats = server.watch_stats();
    assert!(
        stats
            .iter()
            .filter(|s| s.user == "node-a")
            .all(|s| !s.events_by_name.contains_key("stranger")),
        "the broker was sent another lock's events: {stats:#?}"
    );

    // 17 elections in one namespace: one namespace watch there.
    for i in 0..17 {
        campaigns.push(
            client
                .campaign(CampaignOptions::new(format!("many-{i}"), "app").namespace("many"))
                .await
                .unwrap(),
        );
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let open = open_of("many");
            if all_lead(&campaigns) && open.len() == 1 && open[0].field_selector.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("one namespace watch in \"many\": {:#?}", open_of("many")));
    assert_eq!(open_of("default").len(), 3);
    drop(campaigns);
    drop(client);
    drop(broker);
}
