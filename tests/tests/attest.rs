//! Pod attestation through the real socket: the broker learns the caller's pid from the kernel
//! (`SO_PEERCRED`: this test process), reads its cgroup and start time from a fabricated proc
//! tree (every runtime layout, and spoofing attempts), and maps the pod UID through a watch of
//! the node's pods on the test API server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use elector_tests::RawClient;
use elector_tests::harness::{Backend, TestBroker, fast_timing};
use elector_tests::kube_api::TestApiServer;
use elector_tests::kube_api::resources::PODS;
use elector_tests::kube_api::store::ObjectKey;
use serde_json::{Value, json};

const CID: &str = "4b5e0e7f0d8f1c2b3a4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a";
const OTHER_CID: &str = "9999999999999999999999999999999999999999999999999999999999999999";

/// `/proc/<our pid>/{stat,cgroup}` as the broker will read them.
struct FakeProc {
    root: PathBuf,
}

impl FakeProc {
    fn new(dir: &Path) -> FakeProc {
        let root = dir.join("proc");
        std::fs::create_dir_all(root.join(std::process::id().to_string())).unwrap();
        let p = FakeProc { root };
        p.set_start_time(4242);
        p
    }
    fn me(&self) -> PathBuf {
        self.root.join(std::process::id().to_string())
    }
    fn set_start_time(&self, t: u64) {
        let stat = format!(
            "{} (test (proc)) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {t} 0 0",
            std::process::id()
        );
        std::fs::write(self.me().join("stat"), stat).unwrap();
    }
    fn set_cgroup(&self, content: &str) {
        std::fs::write(self.me().join("cgroup"), content).unwrap();
    }
    fn exit(&self) {
        let _ = std::fs::remove_file(self.me().join("stat"));
    }
}

async fn create_pod(
    server: &TestApiServer,
    ns: &str,
    name: &str,
    node: &str,
    container_ids: &[&str],
) -> String {
    let client = server.client(server.admin()).await.unwrap();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns);
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example.invalid/app:1"}]}
    }))
    .unwrap();
    let created = pods.create(&Default::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.unwrap();
    if !container_ids.is_empty() {
        set_container_ids(server, ns, name, container_ids);
    }
    uid
}

/// What the kubelet would report in the pod's status.
fn set_container_ids(server: &TestApiServer, ns: &str, name: &str, ids: &[&str]) {
    let statuses: Vec<Value> = ids
        .iter()
        .map(|id| json!({"name": "app", "containerID": format!("containerd://{id}"), "image": "x", "imageID": "", "ready": true, "restartCount": 0}))
        .collect();
    server
        .store()
        .update_with(
            &PODS,
            ObjectKey {
                resource: "pods",
                namespace: ns.into(),
                name: name.into(),
            },
            |old| {
                let mut p = old.clone();
                p["status"]["containerStatuses"] = json!(statuses);
                Ok(p)
            },
        )
        .unwrap();
}

async fn rejected_because(path: &Path, expect: &str) {
    let mut c = RawClient::connect(path).await.unwrap();
    let first = &c.hello;
    assert_eq!(first["event"], "error", "{first}");
    assert_eq!(first["code"], "unattested");
    let msg = first["message"].as_str().unwrap();
    assert!(msg.contains(expect), "{msg:?} should mention {expect:?}");
    assert!(c.next().await.is_none(), "closed after the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_attested_through_the_real_socket() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proc = FakeProc::new(dir.path());
    let uid = create_pod(&server, "team-a", "app-0", "node-a", &[CID]).await;
    create_pod(&server, "team-b", "elsewhere", "node-b", &[OTHER_CID]).await;
    let user = server.add_user("node-a", vec![elector_tests::kube_api::Rule::all()]);
    let broker = TestBroker::start_attested(
        "node-a",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&user)),
        fast_timing(),
        true,
        Some(proc.root.clone()),
    );
    let u = uid.replace('-', "_");
    let layouts = [
        format!("12:memory:/kubepods/burstable/pod{uid}/{CID}\n1:cpu:/kubepods/burstable/pod{uid}/{CID}\n"),
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope\n"
        ),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope\n"
        ),
        format!("0::/docker/{OTHER_CID}/kubepods/besteffort/pod{uid}/{CID}\n"),
        // Relative to the broker's cgroup namespace: only the container; found by container ID.
        format!("0::/../crio-{CID}.scope\n"),
    ];
    for layout in &layouts {
        proc.set_cgroup(layout);
        let mut c = RawClient::connect(&broker.socket).await.unwrap();
        let hello = c.hello.clone();
        assert_eq!(hello["event"], "hello", "{layout}: {hello}");
        assert_eq!(hello["caller"], json!({"namespace": "team-a", "pod": "app-0"}));
        assert_eq!(hello["default_namespace"], "team-a");
        // Defaults are the caller's own namespace and pod name.
        let ok = c.ask(json!({"op":"campaign","election":"job"})).await;
        assert_eq!(
            (ok["namespace"].clone(), ok["identity"].clone()),
            (json!("team-a"), json!("app-0")),
            "{ok}"
        );
        let e = c
            .ask(json!({"op":"campaign","election":"x","namespace":"team-b","identity":"app-0"}))
            .await;
        assert_eq!(e["code"], "forbidden_namespace");
        let e = c
            .ask(json!({"op":"observe","election":"x","namespace":"kube-system"}))
            .await;
        assert_eq!(e["code"], "forbidden_namespace");
        let e = c
            .ask(json!({"op":"campaign","election":"y","identity":"app-1"}))
            .await;
        assert_eq!(e["code"], "forbidden_identity");
        let e = c
            .ask(json!({"op":"campaign","election":"y","identity":"app-00"}))
            .await;
        assert_eq!(e["code"], "forbidden_identity");
        let ok = c
            .ask(json!({"op":"campaign","election":"z","identity":"app-0/worker-1"}))
            .await;
        assert_eq!(ok["event"], "ok", "{ok}");
    }

    // Spoofing and failure cases.
    proc.set_cgroup(&format!(
        "0::/kubepods/pod{uid}/pod11111111-2222-3333-4444-555555555555/{CID}\n"
    ));
    rejected_because(&broker.socket, "more than one pod").await;
    proc.set_cgroup("0::/user.slice/user-1000.slice/session-1.scope\n");
    rejected_because(&broker.socket, "no pod").await;
    proc.set_cgroup("0::/kubepods/pod11111111-2222-3333-4444-555555555555/x\n");
    rejected_because(&broker.socket, "not (yet) known").await;
    proc.set_cgroup(&format!("0::/kubepods/pod{uid}/{}\n", "ab".repeat(32)));
    rejected_because(&broker.socket, "is not one of pod team-a/app-0's containers").await;
    proc.exit();
    rejected_because(&broker.socket, "is gone").await;

    // A pod that started a moment ago: waited for, then accepted.
    proc.set_start_time(4242);
    let late_cid = "cd".repeat(32);
    proc.set_cgroup(&format!("0::/../cri-containerd-{late_cid}.scope\n"));
    let connecting = tokio::spawn({
        let path = broker.socket.clone();
        async move { RawClient::connect(&path).await.unwrap().hello }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    create_pod(&server, "team-c", "fresh", "node-a", &[&late_cid]).await;
    let hello = connecting.await.unwrap();
    assert_eq!(
        hello["caller"],
        json!({"namespace": "team-c", "pod": "fresh"}),
        "{hello}"
    );

    // The pid is reused while the broker looks the pod up: rejected.
    let later_cid = "ef".repeat(32);
    proc.set_cgroup(&format!("0::/../cri-containerd-{later_cid}.scope\n"));
    let connecting = tokio::spawn({
        let path = broker.socket.clone();
        async move { RawClient::connect(&path).await.unwrap().hello }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proc.set_start_time(9999);
    create_pod(&server, "team-c", "later", "node-a", &[&later_cid]).await;
    let first = connecting.await.unwrap();
    assert_eq!(first["code"], "unattested");
    assert!(first["message"].as_str().unwrap().contains("reused"), "{first}");

    // Rejections are counted by reason.
    let (_, metrics) = elector_tests::http_get(broker.http_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    for reason in [
        "ambiguous_pod",
        "not_a_pod",
        "unknown_pod",
        "container_mismatch",
        "process_gone",
        "pid_reused",
    ] {
        assert!(
            metrics.contains(&format!(
                "elector_attestation_failures_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason} missing in {metrics}"
        );
    }
}

/// Under attestation a leadership survives a broker restart only for the pod that led
/// (protocol 1.1 `resume`, issue #13): the record names the holder's pod UID
/// (`elector.dev/holder-pod`). Another pod cannot claim the identity at all; a pod recreated
/// under the same name has its claim refused (`lost`) and campaigns anew, in a new term; the
/// pod that led resumes in its term. Nobody else's resume writes anything.
#[tokio::test]
async fn only_the_pod_that_led_resumes_after_a_broker_restart() {
    use elector_tests::raw::RawClient;
    use k8s_openapi::api::coordination::v1::Lease;
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proc = FakeProc::new(dir.path());
    let uid = create_pod(&server, "team-a", "app-0", "node-a", &[CID]).await;
    create_pod(&server, "team-a", "app-1", "node-a", &[OTHER_CID]).await;
    let user = server.add_user("node-a", vec![elector_tests::kube_api::Rule::all()]);
    let start = || {
        TestBroker::start_attested(
            "node-a",
            dir.path(),
            Backend::Kube(server.kubeconfig_path(&user)),
            fast_timing(),
            false,
            Some(proc.root.clone()),
        )
    };
    let as_pod = |cid: &str| proc.set_cgroup(&format!("0::/../cri-containerd-{cid}.scope\n"));
    let leases: kube::Api<Lease> =
        kube::Api::namespaced(server.client(server.admin()).await.unwrap(), "team-a");
    let holder_pod = |l: &Lease| {
        l.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("elector.dev/holder-pod").cloned())
    };
    let timing = json!({"lease_duration":8,"renew_deadline":6,"retry_period":0.5});

    // app-0 leads; the record names its pod.
    as_pod(CID);
    let broker = start();
    let mut app = RawClient::open(&broker.socket).await;
    assert_eq!(app.hello["caller"]["pod"], "app-0");
    app.send(json!({"op":"campaign","election":"job","timing":timing}))
        .await;
    let elected = app.until("elected").await;
    let (term, valid_until) = (elected["term"].as_u64().unwrap(), elected["valid_until"].clone());
    assert_eq!(
        holder_pod(&leases.get("job").await.unwrap()).as_deref(),
        Some(uid.as_str())
    );
    broker.kill();
    drop(app);

    // Another pod claims app-0's leadership: it may not even use the identity.
    let broker = start();
    server.clear_requests();
    as_pod(OTHER_CID);
    let mut other = RawClient::open(&broker.socket).await;
    assert_eq!(other.hello["caller"]["pod"], "app-1");
    other
        .send(
            json!({"op":"resume","election":"job","identity":"app-0","timing":timing,
            "term":term,"valid_until":valid_until}),
        )
        .await;
    assert_eq!(other.error_code().await, "forbidden_identity");
    // The pod that led resumes: same term, confirmed by its own renewal.
    as_pod(CID);
    let mut app = RawClient::open(&broker.socket).await;
    app.send(json!({"op":"resume","id":1,"election":"job","timing":timing,
        "term":term,"valid_until":valid_until}))
        .await;
    let safe = app.until("safe").await;
    assert_eq!(safe["term"].as_u64(), Some(term), "{safe}");
    let lease = leases.get("job").await.unwrap();
    assert_eq!(
        lease.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("app-0")
    );
    assert_eq!(holder_pod(&lease).as_deref(), Some(uid.as_str()));
    broker.kill();
    drop((app, other));

    // app-0 is deleted and recreated on the node while the broker is down: a new pod (new UID,
    // new container) under the old name. Its claim to the old term is refused; it campaigns and
    // leads in a new term.
    server
        .store()
        .delete(
            &PODS,
            ObjectKey {
                resource: "pods",
                namespace: "team-a".into(),
                name: "app-0".into(),
            },
        )
        .unwrap();
    let new_cid = "ab".repeat(32);
    let new_uid = create_pod(&server, "team-a", "app-0", "node-a", &[&new_cid]).await;
    assert_ne!(new_uid, uid);
    let broker = start();
    server.clear_requests();
    as_pod(&new_cid);
    let mut reborn = RawClient::open(&broker.socket).await;
    reborn
        .send(json!({"op":"resume","id":2,"election":"job","timing":timing,
            "term":term,"valid_until":valid_until}))
        .await;
    let lost = reborn.until("lost").await;
    assert_eq!(
        (lost["reason"].as_str(), lost["term"].as_u64()),
        (Some("preempted"), Some(term))
    );
    let elected = reborn.until("elected").await;
    assert!(elected["term"].as_u64().unwrap() > term, "a new term: {elected}");
    let lease = leases.get("job").await.unwrap();
    assert_eq!(holder_pod(&lease).as_deref(), Some(new_uid.as_str()));
    drop(broker);
}
