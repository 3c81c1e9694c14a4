//! The socket protocol through a real Unix socket: every op, every kind of bad input, limits,
//! deadlines, slow readers, many connections, shutdown. The broker runs on the memory lock.

use std::time::Duration;

use elector_broker::daemon::{Daemon, DaemonConfig};
use elector_broker::socket::Limits;
use elector_tests::RawClient;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

async fn broker(limits: Limits) -> (Daemon, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/elector.sock");
    let mut config = DaemonConfig::for_socket(&path, "node-t");
    config.limits = limits;
    let d = Daemon::start_standalone(config).await.unwrap();
    (d, dir, path)
}

/// `is_me` belongs to the connection: a connection that campaigns in an election and also
/// observes it is told `is_me: true` on every `leader` event while its candidate leads, whichever
/// membership the event comes from; another connection never is.
#[tokio::test]
async fn is_me_is_per_connection() {
    let (d, _dir, path) = broker(Limits::default()).await;
    // `me`'s events stay unread until the end, so every one of them is checked.
    let mut me = RawClient::open(&path).await;
    me.send(json!({"op":"campaign","election":"x","identity":"me"}))
        .await;
    me.send(json!({"op":"observe","election":"x"})).await;
    let mut other = RawClient::open(&path).await;
    other
        .send(json!({"op":"campaign","election":"x","identity":"other"}))
        .await;
    other.until("ok").await;
    other.send(json!({"op":"observe","election":"x"})).await;
    // Hand over to "other", then back.
    me.send(json!({"op":"resign","election":"x"})).await;
    other.until("elected").await;
    me.send(json!({"op":"campaign","election":"x","identity":"me"}))
        .await;
    other.send(json!({"op":"resign","election":"x"})).await;
    while other.until("leader").await["leader"] != "me" {}
    me.send(json!({"op":"ping","id":"end"})).await;
    other.send(json!({"op":"ping","id":"end"})).await;

    let mut leaders = Vec::new();
    for (who, conn) in [("me", &mut me), ("other", &mut other)] {
        loop {
            let e = conn.next().await.unwrap();
            if e["event"] == "pong" {
                break;
            }
            if e["event"] == "leader" && !e["leader"].is_null() {
                let leads = e["leader"] == who;
                assert_eq!(e["is_me"], leads, "{who} was told {e}");
                leaders.push((who, e["leader"].clone()));
            }
        }
    }
    assert!(leaders.contains(&("me", json!("me"))) && leaders.contains(&("me", json!("other"))));
    d.shutdown().await;
}

#[tokio::test]
async fn every_op_and_event() {
    let (d, _dir, path) = broker(Limits::default()).await;
    let mut a = RawClient::open(&path).await;
    a.send(json!({"op":"campaign","id":1,"election":"job","identity":"pod-a"}))
        .await;
    // `leader` events coalesce (the latest replaces an unread older one), so the initial
    // `null` may be superseded by the time it is read; `ok` and `elected` always arrive.
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|e: &&Value| e["event"] == "ok" || e["event"] == "elected")
        .count()
        < 2
    {
        seen.push(a.next().await.unwrap());
    }
    let ok = seen.iter().find(|e| e["event"] == "ok").unwrap();
    assert_eq!(
        (ok["id"].clone(), ok["op"].clone(), ok["namespace"].clone()),
        (json!(1), json!("campaign"), json!("default"))
    );
    let e = seen.iter().find(|e| e["event"] == "elected").unwrap();
    assert_eq!(
        (e["identity"].clone(), e["term"].clone()),
        (json!("pod-a"), json!(0))
    );
    a.send(json!({"op":"status","id":"s0"})).await;
    let s = a.until("status").await;
    assert_eq!(
        (
            s["campaigns"][0]["leader"].clone(),
            s["campaigns"][0]["is_me"].clone()
        ),
        (json!("pod-a"), json!(true))
    );

    let mut o = RawClient::open(&path).await;
    o.send(json!({"op":"observe","id":"o","election":"job"})).await;
    let (mut got_ok, mut got_leader) = (false, false);
    while !(got_ok && got_leader) {
        let e = o.next().await.unwrap();
        got_ok |= e["event"] == "ok" && e["op"] == "observe";
        got_leader |= e["event"] == "leader" && e["leader"] == "pod-a";
    }

    let mut b = RawClient::open(&path).await;
    b.send(json!({"op":"campaign","election":"job","identity":"pod-b","priority":3}))
        .await;
    b.until("ok").await;
    a.send(json!({"op":"status","id":"s"})).await;
    let s = a.until("status").await;
    assert_eq!(s["campaigns"][0]["is_me"], true);
    assert_eq!(s["campaigns"][0]["identity"], "pod-a");

    a.send(json!({"op":"resign","id":2,"election":"job"})).await;
    let lost = a.until("lost").await;
    assert_eq!(lost["reason"], "resigned");
    assert_eq!(a.until("ok").await["op"], "resign");
    let e = b.until("elected").await;
    assert_eq!(e["term"], 1, "terms grow on every change of holder");
    // The observer's latest state (events coalesce; `status` reports the latest).
    let mut leader = Value::Null;
    for _ in 0..100 {
        o.send(json!({"op":"status"})).await;
        let st = o.until("status").await;
        leader = st["observations"][0]["leader"].clone();
        if leader == "pod-b" {
            assert_eq!(st["observations"][0]["term"], 1);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(leader, "pod-b");
    o.send(json!({"op":"unobserve","election":"job"})).await;
    assert_eq!(o.until("ok").await["op"], "unobserve");
    o.send(json!({"op":"unobserve","election":"job"})).await;
    assert_eq!(o.error_code().await, "not_observing");
    a.send(json!({"op":"resign","election":"job"})).await;
    assert_eq!(a.error_code().await, "not_campaigning");
    drop(b);
    d.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_a_code_and_the_connection_stays_usable() {
    let (d, _dir, path) = broker(Limits::default()).await;
    let mut c = RawClient::open(&path).await;
    let mut long = vec![b'x'; 70 * 1024];
    long.push(b'\n');
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (long, "line_too_long"),
        (b"\xff\xfe\n".to_vec(), "invalid_utf8"),
        (b"{not json\n".to_vec(), "invalid_json"),
        (b"[1,2]\n".to_vec(), "invalid_request"),
        (br#"{"op":"fly"}"#.iter().copied().chain(*b"\n").collect(), "unknown_op"),
        (br#"{"op":"campaign","identity":"a"}"#.iter().copied().chain(*b"\n").collect(), "invalid_request"),
        (br#"{"op":"campaign","election":7,"identity":"a"}"#.iter().copied().chain(*b"\n").collect(), "invalid_request"),
        (br#"{"op":"campaign","election":"Bad_Name","identity":"a"}"#.iter().copied().chain(*b"\n").collect(), "invalid_election"),
        (br#"{"op":"campaign","election":"ok","namespace":"a.b","identity":"a"}"#.iter().copied().chain(*b"\n").collect(), "invalid_namespace"),
        (br#"{"op":"campaign","election":"ok"}"#.iter().copied().chain(*b"\n").collect(), "invalid_identity"),
        (br#"{"op":"campaign","election":"ok","identity":"a","timing":{"lease_duration":5,"renew_deadline":6}}"#.iter().copied().chain(*b"\n").collect(), "invalid_timing"),
        (br#"{"op":"campaign","election":"ok","identity":"a","timing":{"retry_period":-1}}"#.iter().copied().chain(*b"\n").collect(), "invalid_timing"),
        (br#"{"op":"campaign","election":"ok","identity":"a","lock":"configmap"}"#.iter().copied().chain(*b"\n").collect(), "invalid_request"),
    ];
    for (bytes, code) in cases {
        c.send_raw(&bytes).await;
        assert_eq!(
            c.error_code().await,
            code,
            "for {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
        c.ping_ok().await;
    }
    // The id of a rejected request comes back with its error.
    c.send(json!({"op":"resign","id":"r1","election":"nope"})).await;
    let e = c.until("error").await;
    assert_eq!(
        (e["id"].clone(), e["code"].clone()),
        (json!("r1"), json!("not_campaigning"))
    );
    // Two campaigns in one election on one connection; one identity twice on the node.
    c.send(json!({"op":"campaign","election":"dup","identity":"x"}))
        .await;
    c.until("ok").await;
    c.send(json!({"op":"campaign","election":"dup","identity":"y"}))
        .await;
    assert_eq!(c.error_code().await, "already_campaigning");
    let mut other = RawClient::open(&path).await;
    other
        .send(json!({"op":"campaign","election":"dup","identity":"x"}))
        .await;
    assert_eq!(other.error_code().await, "identity_in_use");
    d.shutdown().await;
}

#[tokio::test]
async fn persistent_garbage_closes_the_connection_only() {
    let (d, _dir, path) = broker(Limits::default()).await;
    let mut bystander = RawClient::open(&path).await;
    bystander
        .send(json!({"op":"campaign","election":"keep","identity":"b"}))
        .await;
    bystander.until("elected").await;
    let mut c = RawClient::open(&path).await;
    for _ in 0..20 {
        c.send_raw(b"garbage\n").await;
    }
    let mut codes = Vec::new();
    while let Some(e) = c.next().await {
        codes.push(e["code"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(codes.last().map(String::as_str), Some("too_many_errors"));
    assert_eq!(codes.len(), 17, "16 errors, then the final one: {codes:?}");
    bystander.ping_ok().await;
    d.shutdown().await;
}

#[tokio::test]
async fn deadlines_and_limits() {
    let limits = Limits {
        first_request_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
        max_elections_per_connection: 2,
        max_connections_per_uid: 5,
        ..Limits::default()
    };
    let (d, _dir, path) = broker(limits).await;
    let mut silent = RawClient::open(&path).await;
    assert_eq!(silent.error_code().await, "timeout");
    assert!(silent.next().await.is_none());

    let mut idle = RawClient::open(&path).await;
    idle.ping_ok().await;
    assert_eq!(idle.error_code().await, "timeout");

    // Campaigning keeps a connection open past the idle deadline.
    let mut busy = RawClient::open(&path).await;
    busy.send(json!({"op":"campaign","election":"e1","identity":"a"}))
        .await;
    busy.until("ok").await;
    busy.send(json!({"op":"observe","election":"e2"})).await;
    busy.until("ok").await;
    busy.send(json!({"op":"observe","election":"e3"})).await;
    assert_eq!(busy.error_code().await, "too_many_campaigns");
    tokio::time::sleep(Duration::from_millis(500)).await;
    busy.ping_ok().await;

    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(RawClient::open(&path).await);
    }
    let refused = RawClient::connect(&path).await.unwrap();
    assert_eq!(refused.hello["code"], "too_many_connections");
    d.shutdown().await;
}

#[tokio::test]
async fn a_reader_that_falls_behind_gets_the_latest_state_and_one_that_never_reads_is_cut_off() {
    let limits = Limits {
        outbox_limit: 64,
        write_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let (d, _dir, path) = broker(limits).await;
    // An observer that does not read while the leader changes 300 times.
    let mut slow = RawClient::open(&path).await;
    slow.send(json!({"op":"observe","election":"flap"})).await;
    let mut flapper = RawClient::open(&path).await;
    for i in 0..300 {
        flapper
            .send(json!({"op":"campaign","election":"flap","identity":format!("p{i}")}))
            .await;
        flapper.until("elected").await;
        flapper.send(json!({"op":"resign","election":"flap"})).await;
        flapper.until("ok").await;
    }
    flapper
        .send(json!({"op":"campaign","election":"flap","identity":"final"}))
        .await;
    flapper.until("elected").await;
    // The slow reader catches up to the latest state, and nothing comes after it.
    loop {
        let e = slow.next().await.expect("events until the latest state");
        if e["event"] == "leader" && e["leader"] == "final" {
            break;
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow.next())
            .await
            .is_err(),
        "nothing after the latest state"
    );

    // A client that sends but never reads: its replies pile up until it is disconnected; the
    // broker stays responsive meanwhile.
    let mut stuck = tokio::net::UnixStream::connect(&path).await.unwrap();
    let ping = b"{\"op\":\"ping\"}\n".repeat(1000);
    let mut cut = false;
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(2), stuck.write_all(&ping)).await {
            Ok(Ok(())) => {}
            _ => {
                cut = true;
                break;
            }
        }
        flapper.ping_ok().await;
    }
    assert!(cut, "a client that never reads is disconnected");
    flapper.ping_ok().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections() {
    let (d, _dir, path) = broker(Limits::default()).await;
    let mut conns = Vec::new();
    for i in 0..1000 {
        let mut c = RawClient::open(&path).await;
        c.send(json!({"op":"campaign","election":format!("e{}", i % 50),"identity":format!("pod-{i}")}))
            .await;
        conns.push(c);
    }
    for c in &mut conns {
        c.until("ok").await;
    }
    assert_eq!(d.elections().len(), 50);
    let leaders = d
        .elections()
        .info()
        .await
        .iter()
        .filter(|i| i.leader.is_some())
        .count();
    assert_eq!(leaders, 50);
    drop(conns);
    // Every election is torn down when its last party leaves.
    for _ in 0..200 {
        if d.elections().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(d.elections().is_empty(), "{} elections left", d.elections().len());
    assert_eq!(d.elections().open_watches(), 0);
    d.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_leaders_and_removes_the_socket() {
    let (d, _dir, path) = broker(Limits::default()).await;
    let mut c = RawClient::open(&path).await;
    c.send(json!({"op":"campaign","election":"job","identity":"a"}))
        .await;
    c.until("elected").await;
    d.shutdown().await;
    let lost = c.until("lost").await;
    assert_eq!(lost["reason"], "broker_shutdown");
    assert!(!path.exists(), "the socket file is removed");
}

#[tokio::test]
async fn socket_path_is_replaced_only_if_it_is_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elector.sock");
    std::fs::write(&path, b"precious").unwrap();
    let config = DaemonConfig::for_socket(&path, "n");
    let err = Daemon::start_standalone(config.clone()).await.unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    // A stale socket (left by a crash) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let d = Daemon::start_standalone(config).await.unwrap();
    let _c = RawClient::open(&path).await;
    d.shutdown().await;
}

/// A second broker on a live broker's path refuses to start, with a clear error; the first
/// keeps serving its clients and its socket file (issue: two leaders of one election).
#[tokio::test]
async fn a_second_broker_refuses_a_live_socket() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elector.sock");
    let first = Daemon::start_standalone(DaemonConfig::for_socket(&path, "n"))
        .await
        .unwrap();
    let mut leader = RawClient::open(&path).await;
    leader
        .send(json!({"op":"campaign","id":1,"election":"x","identity":"first"}))
        .await;
    leader.until("elected").await;
    let inode = std::fs::metadata(&path).unwrap().ino();

    // In-process: a typed error.
    let err = Daemon::start_standalone(DaemonConfig::for_socket(&path, "n"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another electord"), "{err}");

    // As users run it: the process exits non-zero and says why.
    let out = tokio::process::Command::new(elector_tests::workspace_bin("elector-broker", "electord"))
        .args(["--standalone", "--http-addr", "127.0.0.1:0", "--socket"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another electord is serving"), "{stderr}");

    // The first broker still owns the path and serves: nobody else can be elected in x.
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "the file stays");
    let mut second = RawClient::open(&path).await;
    second
        .send(json!({"op":"campaign","id":2,"election":"x","identity":"second"}))
        .await;
    let seen = second.until("leader").await;
    assert_eq!(seen["leader"], "first");
    leader.ping_ok().await;
    first.shutdown().await;
    assert!(!path.exists(), "removed on a clean exit");
}

/// A broker removes its socket file on exit only if the file is still its own.
#[tokio::test]
async fn a_broker_never_removes_a_successors_socket_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elector.sock");
    let first = Daemon::start_standalone(DaemonConfig::for_socket(&path, "n"))
        .await
        .unwrap();
    // Something else put its own socket at the path meanwhile.
    let other = dir.path().join("other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    std::fs::rename(&other, &path).unwrap();
    let theirs = std::fs::metadata(&path).unwrap().ino();
    first.shutdown().await;
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), theirs, "left in place");
}
