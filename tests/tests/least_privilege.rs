//! Least privilege (issue #14), against the test API server with deploy/'s RBAC bound as the
//! manifests bind it and deploy/admission-policy.yaml loaded as shipped:
//! - a compromised broker (a raw kube client with the broker's own credentials, node n1 in its
//!   token) is refused everything that is not a lock write of its own node in an enabled
//!   namespace;
//! - the normal broker, through the same policy, elects, renews, releases and interoperates with
//!   client-go's records;
//! - campaigning on an Endpoints lock named like a live Service never writes the Service's
//!   Endpoints, and the broker keeps serving everyone else, as it does when an app asks for a
//!   namespace that is not enabled.

use std::path::Path;
use std::time::Duration;

use elector_client::protocol::{LockKind, Timing};
use elector_client::{CampaignOptions, Client};
use elector_tests::harness::{Backend, TestBroker, fast_timing};
use elector_tests::kube_api::{Rule, TestApiServer, User};
use elector_tests::manifests::{broker_service_account, cluster_role_rules, install_admission_policy};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Endpoints;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

const ENABLED: &str = "shop";
const NOT_ENABLED: &str = "other";
const POLICY: &str =
    "ValidatingAdmissionPolicy 'electord-lock-writes' with binding 'electord-lock-writes' denied request";

const TIMING: Timing = Timing {
    lease_duration: Some(2),
    renew_deadline: Some(1.5),
    retry_period: Some(0.25),
};

/// The rules deploy/ grants the broker: pod reads everywhere, locks where a RoleBinding is.
fn deployed_rules(lock_namespaces: &[&str]) -> Vec<Rule> {
    let mut rules = cluster_role_rules("electord-attestation", None);
    rules.extend(cluster_role_rules("electord-locks", Some(lock_namespaces)));
    rules
}

/// A server with the policy installed, namespace `shop` enabled (label) and `other` not, and
/// kube-system labelled as if someone had tried to enable it.
async fn cluster() -> TestApiServer {
    let server = TestApiServer::start().await.unwrap();
    install_admission_policy(&server).await.unwrap();
    server
        .create_namespace(ENABLED, &[("elector.dev/enabled", "true")])
        .await
        .unwrap();
    server.create_namespace(NOT_ENABLED, &[]).await.unwrap();
    server
        .create_namespace("kube-system", &[("elector.dev/enabled", "true")])
        .await
        .unwrap();
    server
}

/// The broker's service account with a token bound to a pod on `node`.
fn broker_credentials(server: &TestApiServer, node: &str, rules: Vec<Rule>) -> User {
    let (namespace, name) = broker_service_account();
    server.add_bound_service_account(&namespace, &name, &format!("electord-{node}"), node, rules)
}

fn lease(name: &str, node: Option<&str>) -> Lease {
    let mut meta = json!({"name": name});
    if let Some(node) = node {
        meta["annotations"] = json!({"elector.dev/node": node});
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {"holderIdentity": "evil", "leaseDurationSeconds": 3600, "leaseTransitions": 0}
    }))
    .unwrap()
}

/// The refusal's status code and message.
fn refusal<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn assert_policy_denied<T: std::fmt::Debug>(r: Result<T, kube::Error>, why: &str) {
    let (code, message) = refusal(r);
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains(&format!("{POLICY}: {why}")),
        "expected the policy to refuse with {why:?}: {message}"
    );
}

fn assert_rbac_denied<T: std::fmt::Debug>(r: Result<T, kube::Error>, verb: &str, resource: &str, ns: &str) {
    let (code, message) = refusal(r);
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains(&format!("cannot {verb} resource \"{resource}\" in API group"))
            && message.ends_with(&format!("in the namespace \"{ns}\"")),
        "expected RBAC to refuse: {message}"
    );
}

fn live_service_endpoints() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "web", "namespace": ENABLED, "labels": {"app": "web"}},
        "subsets": [{"addresses": [{"ip": "10.0.0.9"}], "ports": [{"port": 80}]}]
    })
}

#[tokio::test]
async fn a_compromised_broker_is_refused_everything_but_its_own_nodes_lock_writes() {
    let server = cluster().await;
    server.create_object(&live_service_endpoints()).await.unwrap();
    let as_deployed = broker_credentials(&server, "n1", deployed_rules(&[ENABLED]));
    let raw = server.client(&as_deployed).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(raw.clone(), ENABLED);
    let endpoints: Api<Endpoints> = Api::namespaced(raw.clone(), ENABLED);
    let pp = PostParams::default();

    // Control: a lock write naming its own node is admitted.
    leases.create(&pp, &lease("mine", Some("n1"))).await.unwrap();

    // A record naming another node, or none.
    assert_policy_denied(
        leases.create(&pp, &lease("forged", Some("n2"))).await,
        "elector: the writer is on node n1 but the object names n2",
    );
    assert_policy_denied(
        leases.create(&pp, &lease("anonymous", None)).await,
        "elector: the writer is on node n1 but the object names no node",
    );
    let mut mine = leases.get("mine").await.unwrap();
    mine.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("elector.dev/node".into(), "n2".into());
    assert_policy_denied(
        leases.replace("mine", &pp, &mine).await,
        "elector: the writer is on node n1 but the object names n2",
    );

    // Subsets written into a Service's Endpoints: a new one, the live one kept, the live one
    // blanked.
    let mut web2: Endpoints = serde_json::from_value(live_service_endpoints()).unwrap();
    web2.metadata.name = Some("web2".into());
    web2.metadata.labels = None;
    web2.metadata.annotations = Some([("elector.dev/node".to_string(), "n1".to_string())].into());
    assert_policy_denied(
        endpoints.create(&pp, &web2).await,
        "elector: an Endpoints lock carries no subsets",
    );
    let mut web = endpoints.get("web").await.unwrap();
    web.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("elector.dev/node".into(), "n1".into());
    web.subsets.as_mut().unwrap()[0].addresses.as_mut().unwrap()[0].ip = "10.6.6.6".into();
    assert_policy_denied(
        endpoints.replace("web", &pp, &web).await,
        "elector: an Endpoints lock carries no subsets",
    );
    web.subsets = None;
    assert_policy_denied(
        endpoints.replace("web", &pp, &web).await,
        "elector: this Endpoints object has subsets (a live Service), not a lock",
    );

    // An Endpoints lock: only elector's annotations and label may change.
    let lock: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "lock", "annotations": {"elector.dev/node": "n1",
            "control-plane.alpha.kubernetes.io/leader": "{\"holderIdentity\":\"a\"}"},
            "labels": {"app.kubernetes.io/managed-by": "elector"}}
    }))
    .unwrap();
    let lock = endpoints.create(&pp, &lock).await.unwrap();
    let mut annotated = lock.clone();
    annotated
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("service.kubernetes.io/topology-mode".into(), "Auto".into());
    assert_policy_denied(
        endpoints.replace("lock", &pp, &annotated).await,
        "elector: only the leader record and elector.dev/ annotations of an Endpoints lock may change",
    );
    let mut labelled = lock.clone();
    labelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("kubernetes.io/service-name".into(), "web".into());
    assert_policy_denied(
        endpoints.replace("lock", &pp, &labelled).await,
        "elector: only the app.kubernetes.io/managed-by label of an Endpoints lock may change",
    );

    // A namespace that is not enabled: RBAC has no RoleBinding there.
    let elsewhere: Api<Lease> = Api::namespaced(raw.clone(), NOT_ENABLED);
    assert_rbac_denied(
        elsewhere.create(&pp, &lease("job", Some("n1"))).await,
        "create",
        "leases",
        NOT_ENABLED,
    );
    // kube-system and deletes: RBAC already refuses them as deployed...
    let system: Api<Lease> = Api::namespaced(raw.clone(), "kube-system");
    assert_rbac_denied(
        system.create(&pp, &lease("kube-scheduler", Some("n1"))).await,
        "create",
        "leases",
        "kube-system",
    );
    assert_rbac_denied(
        leases.delete("mine", &DeleteParams::default()).await,
        "delete",
        "leases",
        ENABLED,
    );

    // ...and the policy refuses them even where the lock role was bound by mistake (in
    // kube-system, which even carries the opt-in label here) and delete was granted.
    let mut misgranted = deployed_rules(&[ENABLED, "kube-system", NOT_ENABLED]);
    misgranted.push(Rule::new(
        &["delete"],
        &["", "coordination.k8s.io"],
        &["leases", "endpoints"],
    ));
    let misbound = server
        .client(&broker_credentials(&server, "n1", misgranted))
        .await
        .unwrap();
    let system: Api<Lease> = Api::namespaced(misbound.clone(), "kube-system");
    assert_policy_denied(
        system.create(&pp, &lease("kube-scheduler", Some("n1"))).await,
        "elector: lock objects are never written in kube-system",
    );
    let elsewhere: Api<Lease> = Api::namespaced(misbound.clone(), NOT_ENABLED);
    assert_policy_denied(
        elsewhere.create(&pp, &lease("job", Some("n1"))).await,
        "elector: namespace other has not opted in (label elector.dev/enabled=true)",
    );
    let leases_misbound: Api<Lease> = Api::namespaced(misbound.clone(), ENABLED);
    assert_policy_denied(
        leases_misbound.delete("mine", &DeleteParams::default()).await,
        "elector: the broker never deletes lock objects",
    );
    let endpoints_misbound: Api<Endpoints> = Api::namespaced(misbound, ENABLED);
    assert_policy_denied(
        endpoints_misbound.delete("web", &DeleteParams::default()).await,
        "elector: the broker never deletes lock objects",
    );

    // A token without the node (Kubernetes before 1.30, or the feature off) writes nothing.
    let (sa_ns, sa_name) = broker_service_account();
    let legacy = server.add_user(
        &format!("system:serviceaccount:{sa_ns}:{sa_name}"),
        deployed_rules(&[ENABLED]),
    );
    let legacy: Api<Lease> = Api::namespaced(server.client(&legacy).await.unwrap(), ENABLED);
    assert_policy_denied(
        legacy.create(&pp, &lease("old-token", Some("n1"))).await,
        "elector: the writer is on node (none: the token names no node) but the object names n1",
    );

    // Nothing of the Service moved; the policy leaves everyone else alone (the admin writes
    // Endpoints with subsets).
    let admin: Api<Endpoints> = Api::namespaced(server.client(server.admin()).await.unwrap(), ENABLED);
    let web = admin.get("web").await.unwrap();
    assert_eq!(
        web.subsets.unwrap()[0].addresses.as_ref().unwrap()[0].ip,
        "10.0.0.9"
    );
    let mut other_svc: Endpoints = serde_json::from_value(live_service_endpoints()).unwrap();
    other_svc.metadata.name = Some("api".into());
    admin.create(&pp, &other_svc).await.unwrap();
}

/// Reads `records["objects"][name]` from client-go-records.json, as a new object.
fn client_go_record(name: &str) -> Value {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = [
        here.join("../../shared/kube-api-transcripts/client-go-records.json"),
        here.join("../shared/kube-api-transcripts/client-go-records.json"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .expect("client-go-records.json beside the repository");
    let records: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut object = records["objects"][name].clone();
    let meta = object["metadata"].as_object_mut().unwrap();
    for k in ["resourceVersion", "uid", "creationTimestamp"] {
        meta.remove(k);
    }
    meta.insert("namespace".into(), json!(ENABLED));
    object
}

fn node_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<String> {
    meta.annotations.as_ref()?.get("elector.dev/node").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_elects_renews_releases_and_interoperates_through_the_policy() {
    let server = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let mut users = Vec::new();
    let mut brokers = Vec::new();
    for node in ["n1", "n2"] {
        let user = broker_credentials(&server, node, deployed_rules(&[ENABLED]));
        brokers.push(TestBroker::start(
            node,
            dir.path(),
            Backend::Kube(server.kubeconfig_path(&user)),
            fast_timing(),
            false,
        ));
        users.push(user);
    }
    let admin = server.client(server.admin()).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ENABLED);
    let endpoints: Api<Endpoints> = Api::namespaced(admin.clone(), ENABLED);
    let c1 = Client::connect(&brokers[0].socket).await.unwrap();
    let c2 = Client::connect(&brokers[1].socket).await.unwrap();

    // Elect and renew on n1, on both lock kinds: created objects carry the node and the label.
    for lock in [LockKind::Lease, LockKind::Endpoints] {
        let a = c1
            .campaign(
                CampaignOptions::new("job", "pod-a")
                    .namespace(ENABLED)
                    .lock(lock)
                    .timing(TIMING),
            )
            .await
            .unwrap();
        a.elected().await.unwrap();
        let b = c2
            .campaign(
                CampaignOptions::new("job", "pod-b")
                    .namespace(ENABLED)
                    .lock(lock)
                    .timing(TIMING),
            )
            .await
            .unwrap();
        // Longer than a lease: only renewals keep pod-a leading.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            a.state().borrow().is_leader,
            "{lock:?}: renewed through the policy"
        );
        let meta = match lock {
            LockKind::Lease => leases.get("job").await.unwrap().metadata,
            LockKind::Endpoints => endpoints.get("job").await.unwrap().metadata,
        };
        assert_eq!(node_of(&meta).as_deref(), Some("n1"));
        assert_eq!(
            meta.labels
                .unwrap()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("elector")
        );
        // Release on n1; n2 takes over and names itself.
        a.resign().await.unwrap();
        b.elected().await.unwrap();
        let meta = match lock {
            LockKind::Lease => leases.get("job").await.unwrap().metadata,
            LockKind::Endpoints => endpoints.get("job").await.unwrap().metadata,
        };
        assert_eq!(node_of(&meta).as_deref(), Some("n2"));
        b.resign().await.unwrap();
    }

    // client-go's Lease, held (3 s): waited out, taken, then released as client-go would read
    // it; not relabelled.
    let mut held = client_go_record("lease-held");
    held["spec"]["leaseDurationSeconds"] = json!(3);
    server.create_object(&held).await.unwrap();
    let campaign = c1
        .campaign(
            CampaignOptions::new("cg-lease", "pod-x")
                .namespace(ENABLED)
                .timing(TIMING),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), campaign.elected())
        .await
        .unwrap()
        .unwrap();
    let ours = leases.get("cg-lease").await.unwrap();
    assert_eq!(
        ours.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("pod-x")
    );
    assert_eq!(node_of(&ours.metadata).as_deref(), Some("n1"));
    assert_eq!(ours.metadata.labels, None, "client-go's object is not relabelled");
    campaign.resign().await.unwrap();
    let mut released = leases.get("cg-lease").await.unwrap();
    for _ in 0..50 {
        if released.spec.as_ref().unwrap().holder_identity.as_deref() == Some("") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        released = leases.get("cg-lease").await.unwrap();
    }
    assert_eq!(released.spec.unwrap().holder_identity.as_deref(), Some(""));

    // client-go's released Endpoints lock: taken at once, through the Endpoints rules.
    server
        .create_object(&client_go_record("ep-released"))
        .await
        .unwrap();
    let ep = c2
        .campaign(
            CampaignOptions::new("cg-endpoints", "pod-y")
                .namespace(ENABLED)
                .lock(LockKind::Endpoints)
                .timing(TIMING),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), ep.elected())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        node_of(&endpoints.get("cg-endpoints").await.unwrap().metadata).as_deref(),
        Some("n2")
    );
    drop(ep);
    for b in brokers.drain(..) {
        b.shutdown();
    }

    let mine = server.requests_by(&users);
    let refused = server.forbidden_requests_of(&users);
    assert!(refused.is_empty(), "refused: {refused:?}");
    let writes = mine.iter().filter(|r| r.is_write() && r.status < 300).count();
    assert!(writes >= 10, "{writes} writes admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_services_endpoints_and_a_namespace_not_enabled_are_never_written() {
    let server = cluster().await;
    let svc = server.create_object(&live_service_endpoints()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = broker_credentials(&server, "n1", deployed_rules(&[ENABLED]));
    let broker = TestBroker::start(
        "n1",
        dir.path(),
        Backend::Kube(server.kubeconfig_path(&user)),
        fast_timing(),
        false,
    );
    let client = Client::connect(&broker.socket).await.unwrap();
    server.clear_requests();
    let on_service = client
        .campaign(
            CampaignOptions::new("web", "pod-a")
                .namespace(ENABLED)
                .lock(LockKind::Endpoints)
                .timing(TIMING),
        )
        .await
        .unwrap();
    let not_enabled = client
        .campaign(
            CampaignOptions::new("job", "pod-a")
                .namespace(NOT_ENABLED)
                .timing(TIMING),
        )
        .await
        .unwrap();
    // Everyone else is served meanwhile, on the same connection.
    let fine = client
        .campaign(
            CampaignOptions::new("job", "pod-a")
                .namespace(ENABLED)
                .timing(TIMING),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), fine.elected())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(!on_service.state().borrow().is_leader);
    assert!(!not_enabled.state().borrow().is_leader);

    let log = server.requests();
    let service_writes: Vec<String> = log
        .iter()
        .filter(|r| r.is_write() && r.resource == "endpoints")
        .map(|r| format!("{} {} {}", r.user, r.verb, r.path))
        .collect();
    assert!(service_writes.is_empty(), "written: {service_writes:?}");
    assert!(
        log.iter()
            .any(|r| r.resource == "endpoints" && r.verb == "get" && r.name.as_deref() == Some("web")),
        "the broker read the Service's Endpoints (and left them alone)"
    );
    let admin: Api<Endpoints> = Api::namespaced(server.client(server.admin()).await.unwrap(), ENABLED);
    let now = admin.get("web").await.unwrap();
    assert_eq!(
        now.metadata.resource_version.as_deref(),
        svc["metadata"]["resourceVersion"].as_str(),
        "the Service's Endpoints are untouched"
    );
    // The namespace that is not enabled: refused by RBAC, nothing written there.
    let there: Vec<_> = log
        .iter()
        .filter(|r| r.namespace.as_deref() == Some(NOT_ENABLED) && r.is_write())
        .collect();
    assert!(there.iter().all(|r| r.status == 403), "{there:?}");
    // Not a hot loop: one refused request, then a retry every 30 s at most.
    assert!(
        there.len() <= 2,
        "{} requests to a namespace that refuses",
        there.len()
    );

    // The app is told, once each, with a code and the missing permission: through the socket.
    let mut app = elector_tests::RawClient::open(&broker.socket).await;
    let timing = json!({"lease_duration":2,"renew_deadline":1.5,"retry_period":0.25});
    app.send(
        json!({"op":"campaign","election":"job2","namespace":NOT_ENABLED,"identity":"pod-b","timing":timing}),
    )
    .await;
    app.send(
        json!({"op":"campaign","election":"web","namespace":ENABLED,"identity":"pod-b",
        "lock":"endpoints","timing":timing}),
    )
    .await;
    let mut errors = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(e)) = app
        .next_within(until.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if e["event"] == "error" {
            errors.push(e);
        }
    }
    let codes: Vec<&str> = errors.iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert_eq!(
        codes.iter().filter(|c| **c == "api_forbidden").count(),
        1,
        "{errors:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == "not_a_lock").count(),
        1,
        "{errors:?}"
    );
    let forbidden = errors.iter().find(|e| e["code"] == "api_forbidden").unwrap();
    let message = forbidden["message"].as_str().unwrap();
    assert!(
        message.contains(NOT_ENABLED) && message.contains("leases"),
        "{message}"
    );
    app.ping_ok().await;
    drop((on_service, not_enabled, fine));
    broker.shutdown();
}
