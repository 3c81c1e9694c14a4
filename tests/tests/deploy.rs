//! The deployment manifests: they parse into Kubernetes types, agree with the binaries'
//! defaults, and grant exactly what the broker uses (RBAC completeness, against the test API
//! server with the ClusterRoles' rules, bound as the manifests bind them, as the broker's only
//! permissions, and the shipped admission policy in force).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use elector_client::protocol::{DEFAULT_SOCKET_PATH, LockKind};
use elector_client::{CampaignOptions, Client};
use elector_tests::harness::{Backend, TestBroker, fast_timing};
use elector_tests::kube_api::TestApiServer;
use elector_tests::manifests::{
    broker_service_account, cluster_role_rules, documents, install_admission_policy,
};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use serde_json::Value;

fn typed<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    documents()
        .into_iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(p, v)| {
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{}: not a valid {kind}: {e}", p.display()))
        })
        .collect()
}

#[test]
fn every_manifest_parses_into_kubernetes_types() {
    let docs = documents();
    assert!(docs.len() >= 8, "{} documents", docs.len());
    for (path, v) in &docs {
        let kind = v["kind"].as_str().unwrap_or_default();
        let ok = match kind {
            "Namespace" => serde_json::from_value::<Namespace>(v.clone()).is_ok(),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(v.clone()).is_ok(),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(v.clone()).is_ok(),
            "ClusterRoleBinding" => serde_json::from_value::<ClusterRoleBinding>(v.clone()).is_ok(),
            "RoleBinding" => serde_json::from_value::<RoleBinding>(v.clone()).is_ok(),
            "ValidatingAdmissionPolicy" => {
                serde_json::from_value::<ValidatingAdmissionPolicy>(v.clone()).is_ok()
            }
            "ValidatingAdmissionPolicyBinding" => {
                serde_json::from_value::<ValidatingAdmissionPolicyBinding>(v.clone()).is_ok()
            }
            "DaemonSet" => serde_json::from_value::<DaemonSet>(v.clone()).is_ok(),
            "Deployment" => serde_json::from_value::<Deployment>(v.clone()).is_ok(),
            "Kustomization" | "Component" => v["resources"]
                .as_array()
                .unwrap()
                .iter()
                // Relative to the kustomization's own folder: files, or folders of other
                // kustomizations (deploy/examples/ takes the example sources' ConfigMaps).
                .all(|r| path.parent().unwrap().join(r.as_str().unwrap()).exists()),
            other => panic!("{}: unexpected kind {other}", path.display()),
        };
        assert!(ok, "{}: invalid {kind}", path.display());
    }
}

#[tokio::test]
async fn manifests_match_the_binaries_defaults() {
    let ds = &typed::<DaemonSet>("DaemonSet")[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    assert!(args.contains(&"--attest=kubernetes".to_string()), "{args:?}");
    assert_eq!(
        pod.host_pid,
        Some(true),
        "attestation reads callers' /proc entries by host pid"
    );
    assert!(
        args.contains(&format!("--socket={DEFAULT_SOCKET_PATH}")),
        "{args:?}"
    );
    let socket_dir = Path::new(DEFAULT_SOCKET_PATH).parent().unwrap().to_str().unwrap();
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.host_path.is_some())
        .unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, socket_dir);
    assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, socket_dir);
    let http_port: i32 = elector_broker::DEFAULT_HTTP_ADDR
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(args.contains(&format!("--http-addr={}", elector_broker::DEFAULT_HTTP_ADDR)));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, http_port);
    let env: Vec<_> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"NODE_NAME"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
    let ru = ds
        .spec
        .as_ref()
        .unwrap()
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    // Zero-gap upgrades: the new broker surges in and takes the socket over; the old one hands
    // off; restarts and upgrades hand off rather than release.
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        (ru.max_surge.clone(), ru.max_unavailable.clone()),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
    );
    assert!(args.contains(&"--takeover".to_string()), "{args:?}");
    assert!(args.contains(&"--on-shutdown=handoff".to_string()), "{args:?}");
    assert!(pod.termination_grace_period_seconds.unwrap() >= 10);

    // The probe paths answer on a running broker.
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start("n", dir.path(), Backend::Memory, fast_timing(), true);
    for probe in [
        c.liveness_probe.as_ref().unwrap(),
        c.readiness_probe.as_ref().unwrap(),
    ] {
        let path = probe.http_get.as_ref().unwrap().path.clone().unwrap();
        let (status, _) = elector_tests::http_get(broker.http_addr.unwrap(), &path)
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }

    // The example apps mount the socket directory read-only, never the socket file.
    for d in typed::<Deployment>("Deployment") {
        let pod = d.spec.unwrap().template.spec.unwrap();
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.host_path.is_some())
            .unwrap();
        assert_eq!(vol.host_path.unwrap().path, socket_dir);
        for c in pod.containers {
            for m in c
                .volume_mounts
                .unwrap_or_default()
                .iter()
                .filter(|m| m.name == vol.name)
            {
                assert_eq!((m.mount_path.as_str(), m.read_only), (socket_dir, Some(true)));
            }
            if c.args
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x.starts_with("--http=")))
            {
                let port = c.ports.unwrap()[0].container_port;
                assert!(c.args.unwrap().contains(&format!("--http=0.0.0.0:{port}")));
            }
        }
    }
}

#[test]
fn lock_permissions_are_bound_per_namespace_only() {
    let docs = documents();
    let cluster_bound: Vec<String> = docs
        .iter()
        .filter(|(_, v)| v["kind"] == "ClusterRoleBinding")
        .map(|(_, v)| v["roleRef"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        cluster_bound,
        ["electord-attestation"],
        "only pod reads are cluster-wide"
    );
    let attestation = cluster_role_rules("electord-attestation", None);
    assert!(
        attestation
            .iter()
            .all(|r| r.resources == ["pods"] && r.verbs.iter().all(|v| v == "list" || v == "watch")),
        "{attestation:?}"
    );
    let (sa_namespace, sa_name) = broker_service_account();
    let role_bindings: Vec<&Value> = docs
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == "RoleBinding")
        .collect();
    assert_eq!(
        role_bindings.len(),
        1,
        "the enable-namespace component's RoleBinding"
    );
    let rb = role_bindings[0];
    assert_eq!(rb["roleRef"]["name"], "electord-locks");
    assert!(
        rb["metadata"].get("namespace").is_none(),
        "its namespace is the enabling kustomization's"
    );
    assert_eq!(rb["subjects"][0]["name"], sa_name.as_str());
    assert_eq!(rb["subjects"][0]["namespace"], sa_namespace.as_str());
    // The component also labels the namespace with what the admission policy reads.
    let component = docs
        .iter()
        .find(|(_, v)| v["kind"] == "Component")
        .map(|(_, v)| v.clone())
        .unwrap();
    let patch = component["patches"][0]["patch"].as_str().unwrap();
    assert!(patch.contains("elector.dev/enabled: \"true\""), "{patch}");
    let policy = docs
        .iter()
        .find(|(_, v)| v["kind"] == "ValidatingAdmissionPolicy")
        .map(|(_, v)| v.clone())
        .unwrap();
    let text = policy.to_string();
    assert!(text.contains("elector.dev/enabled"));
    assert!(text.contains(&format!("system:serviceaccount:{sa_namespace}:{sa_name}")));
    for system in ["kube-system", "kube-public", "kube-node-lease"] {
        assert!(text.contains(system), "{system} is never enabled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_exactly_what_the_broker_uses() {
    // As deployed: pod reads cluster-wide, lock permissions by a RoleBinding in the one enabled
    // namespace, and the admission policy in force.
    let mut rules = cluster_role_rules("electord-attestation", None);
    rules.extend(cluster_role_rules("electord-locks", Some(&["default"])));
    let (sa_namespace, sa_name) = broker_service_account();
    let server = TestApiServer::start().await.unwrap();
    install_admission_policy(&server).await.unwrap();
    server
        .create_namespace("default", &[("elector.dev/enabled", "true")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut brokers = Vec::new();
    let mut users = Vec::new();
    let admin = server.client(server.admin()).await.unwrap();
    for (node, pod) in [("node-a", "pod-a"), ("node-b", "pod-b")] {
        // This test process is pod-a to node-a's broker and pod-b to node-b's.
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(admin.clone(), "default");
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": pod},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "x:1"}]}
        }))
        .unwrap();
        let uid = pods
            .create(&Default::default(), &p)
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap();
        let proc_root = dir.path().join(format!("proc-{node}"));
        let me = proc_root.join(std::process::id().to_string());
        std::fs::create_dir_all(&me).unwrap();
        std::fs::write(
            me.join("stat"),
            "1 (t) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0",
        )
        .unwrap();
        std::fs::write(
            me.join("cgroup"),
            format!("0::/kubepods/pod{uid}/{}\n", "a".repeat(64)),
        )
        .unwrap();
        let user = server.add_bound_service_account(
            &sa_namespace,
            &sa_name,
            &format!("electord-{node}"),
            node,
            rules.clone(),
        );
        brokers.push(TestBroker::start_attested(
            node,
            dir.path(),
            Backend::Kube(server.kubeconfig_path(&user)),
            fast_timing(),
            false,
            Some(proc_root),
        ));
        users.push(user);
    }
    // Campaign on both lock kinds on both nodes, fail over, and shut down (release).
    for lock in [LockKind::Lease, LockKind::Endpoints] {
        let ca = Client::connect(&brokers[0].socket).await.unwrap();
        let a = ca
            .campaign(CampaignOptions::new("rbac-job", "pod-a").lock(lock))
            .await
            .unwrap();
        a.elected().await.unwrap();
        let cb = Client::connect(&brokers[1].socket).await.unwrap();
        let b = cb
            .campaign(CampaignOptions::new("rbac-job", "pod-b").lock(lock))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        a.resign().await.unwrap();
        b.elected().await.unwrap();
        // pod-b steps down and leads again: the repeated "became leader" Event is counted in
        // the first one's series (a patch).
        b.resign().await.unwrap();
        let b = cb
            .campaign(CampaignOptions::new("rbac-job", "pod-b").lock(lock))
            .await
            .unwrap();
        b.elected().await.unwrap();
        // Someone else writes (a conflict makes the broker re-read with a get).
        let _ = cb.observe("rbac-job", None, lock).await.unwrap();
        drop((b, ca));
    }
    // A lost conflict forces a read: two candidates created at the same moment on two nodes.
    let c1 = Client::connect(&brokers[0].socket).await.unwrap();
    let c2 = Client::connect(&brokers[1].socket).await.unwrap();
    let (x, y) = tokio::join!(
        c1.campaign(CampaignOptions::new("race", "pod-a/x")),
        c2.campaign(CampaignOptions::new("race", "pod-b/y"))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop((x, y));
    for b in brokers.drain(..) {
        b.shutdown();
    }

    let mine = server.requests_by(&users);
    // Neither RBAC nor the admission policy refused anything.
    let forbidden = server.forbidden_requests_of(&users);
    assert!(forbidden.is_empty(), "forbidden: {forbidden:?}");
    assert!(
        mine.iter().any(|r| r.is_write() && r.status < 300),
        "the broker wrote through the policy"
    );
    let used: BTreeSet<(String, String)> = mine
        .iter()
        .filter(|r| r.verb != "discovery")
        .map(|r| (r.verb.clone(), r.resource.clone()))
        .collect();
    let granted: BTreeSet<(String, String)> = rules
        .iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .flat_map(move |v| r.resources.iter().map(move |res| (v.clone(), res.clone())))
        })
        .collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "granted but never used: {unused:?} (used: {used:?})"
    );
    let ungranted: Vec<_> = used.difference(&granted).collect();
    assert!(ungranted.is_empty(), "used but not granted: {ungranted:?}");
}
