//! The deployment manifests under `deploy/`, loaded as files for tests: every YAML document,
//! the RBAC rules of a ClusterRole as test-server [`Rule`]s, and installing the admission policy
//! into a test API server exactly as shipped.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::kube_api::{Rule, TestApiServer};

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document in one file.
pub fn file_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

/// Every YAML document under `deploy/` (recursively), with its file.
pub fn documents() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(d) = dirs.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.extend(file_documents(&p).into_iter().map(|v| (p.clone(), v)));
            }
        }
    }
    out
}

/// The document of `kind` named `name` under `deploy/`.
pub fn document(kind: &str, name: &str) -> Value {
    documents()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} under deploy/"))
}

/// A ClusterRole's rules as the test server's, granted in `namespaces` (`None`: cluster-wide,
/// as a ClusterRoleBinding grants; `Some`: as RoleBindings in those namespaces grant).
pub fn cluster_role_rules(name: &str, namespaces: Option<&[&str]>) -> Vec<Rule> {
    let role = document("ClusterRole", name);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Rule {
            verbs: strings(&r["verbs"]),
            api_groups: strings(&r["apiGroups"]),
            resources: strings(&r["resources"]),
            namespaces: namespaces.map(|n| n.iter().map(|s| s.to_string()).collect()),
        })
        .collect()
}

/// The broker's service account, as the DaemonSet and the RBAC bindings name it:
/// `(namespace, name)`.
pub fn broker_service_account() -> (String, String) {
    let ds = document("DaemonSet", "electord");
    let namespace = ds["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = ds["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (namespace, name)
}

/// Creates deploy/admission-policy.yaml's ValidatingAdmissionPolicy and binding in `server`,
/// through its API (so the CEL is compiled and type-checked as a real server does).
pub async fn install_admission_policy(server: &TestApiServer) -> anyhow::Result<()> {
    for doc in file_documents(&deploy_dir().join("admission-policy.yaml")) {
        server.create_object(&doc).await?;
    }
    Ok(())
}
