//! Pod attestation through the real socket: the broker learns the caller's pid from the kernel
//! (`SO_PEERCRED`: this test process), reads its cgroup and start time from a fabricated proc
//! tree (every runtime layout, and spoofing attempts), and maps the pod UID through a watch of
//! the node's pods on the test API server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use elector_tests::harness::{Backend, TestBroker, fast_timing};
use elector_tests::kube_api::TestApiServer;
use elector_tests::kube_api::resources::PODS;
use elector_tests::kube_api::store::ObjectKey;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

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

struct Conn {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Conn {
    async fn open(path: &Path) -> (Conn, Value) {
        let (r, w) = UnixStream::connect(path).await.unwrap().into_split();
        let mut c = Conn {
            r: BufReader::new(r),
            w,
        };
        let first = c.next().await.expect("a first line");
        (c, first)
    }
    async fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line))
            .await
            .unwrap()
            .ok()?;
        (n > 0).then(|| serde_json::from_str(&line).unwrap())
    }
    async fn ask(&mut self, req: Value) -> Value {
        let mut line = serde_json::to_vec(&req).unwrap();
        line.push(b'\n');
        self.w.write_all(&line).await.unwrap();
        loop {
            let e = self.next().await.expect("reply");
            if e["event"] == "ok" || e["event"] == "error" {
                return e;
            }
        }
    }
}

async fn rejected_because(path: &Path, expect: &str) {
    let (mut c, first) = Conn::open(path).await;
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
        let (mut c, hello) = Conn::open(&broker.socket).await;
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
        async move { Conn::open(&path).await.1 }
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
        async move { Conn::open(&path).await.1 }
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
