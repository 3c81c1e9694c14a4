//! Holds the test API server to a real kube-apiserver: every request recorded in
//! `shared/kube-api-transcripts/` is replayed against a fresh test server, through kube's own
//! HTTP client, and the answer is compared with the real one field by field (status code,
//! content type, Status bodies, objects, watch event lines), ignoring only server-generated
//! values: uid, timestamps the server sets, resourceVersion numbers, managedFields.
//!
//! Each transcript is one request; what must exist before it (and, for watches, what happened
//! while the watch was open) is derived from the transcript itself, so new files are picked up
//! without touching this test.
//!
//! The `admission-v1.32/` folder is replayed the same way, each request in the folder's context:
//! the admission policies and bindings that the folder's own transcripts create are in place
//! (except for those creations themselves), the request's namespace carries the labels the
//! bindings select, and the caller is the user its `auth` describes, a token bound to a pod on a
//! node carrying that node in `userInfo.extra` (the whole `extra` when the expected answer shows
//! it) and without RBAC permission where the expected answer is RBAC's 403.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use elector_tests::kube_api::{NODE_NAME_EXTRA, Rule, TestApiServer, User};
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn transcripts_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ELECTOR_TRANSCRIPTS_DIR") {
        return PathBuf::from(dir);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for candidate in [
        here.join("../../shared/kube-api-transcripts"),
        here.join("../shared/kube-api-transcripts"),
    ] {
        if candidate.is_dir() {
            return candidate;
        }
    }
    panic!("shared/kube-api-transcripts not found beside the repository");
}

const IGNORED: &[&str] = &["uid", "creationTimestamp", "resourceVersion", "managedFields"];

/// Lists every difference between `expected` and `actual`, by JSON path.
fn diff(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                if IGNORED.contains(&k.as_str()) {
                    continue;
                }
                match a.get(k) {
                    Some(av) => diff(ev, av, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: missing (expected {ev})")),
                }
            }
            for k in a.keys() {
                if !IGNORED.contains(&k.as_str()) && !e.contains_key(k) {
                    out.push(format!("{path}.{k}: unexpected (got {})", a[k]));
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                out.push(format!("{path}: {} items expected, got {}", e.len(), a.len()));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                diff(ev, av, &format!("{path}[{i}]"), out);
            }
        }
        (e, a) if e != a => out.push(format!("{path}: expected {e}, got {a}")),
        _ => {}
    }
}

/// An object as a client would send it: without what the server sets.
fn client_side(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in IGNORED {
            meta.remove(*k);
        }
    }
    if let Some(map) = o.as_object_mut() {
        map.remove("status");
    }
    o
}

struct Replay {
    server: TestApiServer,
    admin: kube::Client,
}

impl Replay {
    async fn new() -> Self {
        let server = TestApiServer::start().await.expect("start test server");
        let admin = server.client(server.admin()).await.expect("admin client");
        Replay { server, admin }
    }

    /// A client for the user a transcript's `auth` describes; `response` is the expected answer
    /// (it tells whether the user has RBAC permission and, for a self-review, its whole `extra`).
    async fn client_for(&self, auth: Option<&str>, response: &Value) -> kube::Client {
        let auth = auth.unwrap_or("user admin");
        if auth.contains("invalid token") {
            let bogus = User {
                name: "nobody".into(),
                token: "not-a-known-token".into(),
                rules: vec![],
                extra: BTreeMap::new(),
            };
            return self.server.client(&bogus).await.unwrap();
        }
        let name = auth
            .split("user ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("auth names a user");
        if name == "admin" {
            return self.admin.clone();
        }
        let rbac_denied = response["status"] == 403
            && response["body"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("User \"{name}\" cannot")));
        let rules = if auth.contains("no roles") || rbac_denied {
            vec![]
        } else {
            vec![Rule::all()]
        };
        // "(token bound to pod P on node N)": what a bound token's user carries.
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let word_after = |marker: &str| {
            auth.split(marker)
                .nth(1)
                .and_then(|rest| rest.split([' ', ')']).next())
                .map(str::to_string)
        };
        if let Some(pod) = word_after("bound to pod ") {
            extra.insert("authentication.kubernetes.io/pod-name".into(), vec![pod]);
        }
        if let Some(node) = word_after(" on node ") {
            extra.insert(NODE_NAME_EXTRA.into(), vec![node]);
        }
        if let Some(shown) = response["body"]["status"]["userInfo"]["extra"].as_object() {
            extra = shown
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).unwrap()))
                .collect();
        }
        let user = self.server.add_user_with_extra(name, rules, extra);
        self.server.client(&user).await.unwrap()
    }

    /// Creates the folder's admission policies and bindings, and the namespace of `path` with
    /// the labels the bindings select.
    async fn admission_context(&self, setup: &[Value], path: &str) {
        let mut labels = serde_json::Map::new();
        for t in setup {
            let req = &t["request"];
            self.admin_json("POST", req["path"].as_str().unwrap(), Some(&req["body"]))
                .await;
            if let Some(wanted) =
                req["body"]["spec"]["matchResources"]["namespaceSelector"]["matchLabels"].as_object()
            {
                labels.extend(wanted.clone());
            }
        }
        if let Some((_, ns, _)) = path_target(path) {
            let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": labels}});
            self.admin_json("POST", "/api/v1/namespaces", Some(&namespace))
                .await;
        }
    }

    async fn send(
        &self,
        client: &kube::Client,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, String, http::Response<kube::client::Body>) {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
        let resp = client
            .send(req.body(kube::client::Body::from(bytes)).unwrap())
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (status, ct, resp)
    }

    async fn admin_json(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let ct = body.map(|_| "application/json");
        let (status, _, resp) = self.send(&self.admin, method, path, ct, body).await;
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(status < 300, "set-up {method} {path} failed: {status} {v}");
        v
    }

    /// Makes `object` exist (created from its client-side form).
    async fn ensure(&self, object: &Value) -> Value {
        let path = collection_path(object);
        let name = object["metadata"]["name"].as_str().unwrap();
        let ns = object["metadata"]["namespace"].as_str().unwrap_or("default");
        let mut body = client_side(object);
        body["metadata"]["namespace"] = json!(ns);
        let existing_path = format!("{path}/{name}");
        let (status, _, resp) = self.send(&self.admin, "GET", &existing_path, None, None).await;
        if status == 200 {
            let _ = resp.into_body().collect().await;
            self.admin_json("DELETE", &existing_path, None).await;
        }
        self.admin_json("POST", &path, Some(&body)).await
    }

    async fn replace(&self, object: &Value) -> Value {
        let path = format!(
            "{}/{}",
            collection_path(object),
            object["metadata"]["name"].as_str().unwrap()
        );
        let mut body = client_side(object);
        let current = self.admin_json("GET", &path, None).await;
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        self.admin_json("PUT", &path, Some(&body)).await
    }
}

/// The collection path of an object, from its apiVersion, kind and namespace.
fn collection_path(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or("default");
    match object["kind"].as_str() {
        Some("Lease") => format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
        Some("Endpoints") => format!("/api/v1/namespaces/{ns}/endpoints"),
        Some("Pod") => format!("/api/v1/namespaces/{ns}/pods"),
        other => panic!("unknown kind {other:?}"),
    }
}

/// Parses `/api/v1/namespaces/<ns>/<plural>[/<name>]` into (kind, namespace, name).
fn path_target(path: &str) -> Option<(String, String, Option<String>)> {
    let p = path.split('?').next()?;
    let parts: Vec<&str> = p.trim_matches('/').split('/').collect();
    let i = parts.iter().position(|s| *s == "namespaces")?;
    let ns = parts.get(i + 1)?.to_string();
    let kind = match *parts.get(i + 2)? {
        "leases" => "Lease",
        "endpoints" => "Endpoints",
        "pods" => "Pod",
        _ => return None,
    };
    Some((kind.to_string(), ns, parts.get(i + 3).map(|s| s.to_string())))
}

fn api_version_of(kind: &str) -> &'static str {
    if kind == "Lease" {
        "coordination.k8s.io/v1"
    } else {
        "v1"
    }
}

fn set_query(path: &str, key: &str, value: &str) -> String {
    let (base, query) = path.split_once('?').unwrap_or((path, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with(&format!("{key}=")))
        .map(str::to_string)
        .collect();
    pairs.push(format!("{key}={value}"));
    format!("{base}?{}", pairs.join("&"))
}

/// Whether a transcript creates an admission policy or binding (the admission folder's set-up).
fn creates_admission_config(t: &Value) -> bool {
    t["request"]["method"] == "POST"
        && t["request"]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/apis/admissionregistration.k8s.io/"))
}

async fn replay_request(t: &Value, setup: &[Value]) -> Vec<String> {
    let r = Replay::new().await;
    let req = &t["request"];
    let resp = &t["response"];
    let method = req["method"].as_str().unwrap();
    let mut path = req["path"].as_str().unwrap().to_string();
    if !setup.is_empty() && !creates_admission_config(t) {
        r.admission_context(setup, &path).await;
    }
    let want_status = resp["status"].as_u64().unwrap() as u16;
    let mut body = req.get("body").filter(|b| !b.is_null()).cloned();
    let target = path_target(&path);

    // Preconditions, read off the expected answer.
    match (method, want_status) {
        ("GET", 200) if resp["body"]["items"].is_array() => {
            for item in resp["body"]["items"].as_array().unwrap() {
                let mut obj = item.clone();
                let kind = resp["body"]["kind"]
                    .as_str()
                    .unwrap()
                    .trim_end_matches("List")
                    .to_string();
                obj["kind"] = json!(kind);
                obj["apiVersion"] = json!(api_version_of(&kind));
                r.ensure(&obj).await;
            }
        }
        ("GET", 200) | ("PATCH", 200) => {
            r.ensure(&resp["body"]).await;
        }
        ("POST", 409) | ("PUT", 200) | ("PUT", 409) => {
            let b = body.as_ref().expect("body");
            let (kind, ns, _) = target.clone().expect("namespaced path");
            let mut obj = b.clone();
            obj["kind"] = json!(kind);
            obj["apiVersion"] = json!(api_version_of(&kind));
            obj["metadata"]["namespace"] = json!(ns);
            let created = r.ensure(&obj).await;
            let had_rv = b["metadata"].get("resourceVersion").is_some();
            if had_rv {
                let rv = created["metadata"]["resourceVersion"].clone();
                if want_status == 409 && resp["body"]["reason"] == "Conflict" {
                    r.replace(&created).await; // now `rv` is stale
                }
                body.as_mut().unwrap()["metadata"]["resourceVersion"] = rv;
            }
        }
        _ => {}
    }

    let client = r.client_for(req["auth"].as_str(), resp).await;
    let ct = req["content_type"].as_str();
    let (status, content_type, response) = r.send(&client, method, &path.clone(), ct, body.as_ref()).await;
    let mut problems = Vec::new();
    if status != want_status {
        problems.push(format!("status: expected {want_status}, got {status}"));
    }
    if let Some(want_ct) = resp["content_type"].as_str()
        && content_type != want_ct
    {
        problems.push(format!("content-type: expected {want_ct}, got {content_type}"));
    }
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let actual: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    diff(&resp["body"], &actual, "body", &mut problems);
    path.clear();
    problems
}

async fn replay_watch(t: &Value) -> Vec<String> {
    let r = Replay::new().await;
    let req = &t["request"];
    let want_events = t["response"]["events"].as_array().cloned().unwrap_or_default();
    let mut path = req["path"].as_str().unwrap().to_string();
    let with_rv = path.contains("resourceVersion=");
    let expects_expired = want_events.first().is_some_and(|e| e["type"] == "ERROR");

    if !with_rv {
        // Synthetic ADDED events for what exists.
        for e in &want_events {
            r.ensure(&e["object"]).await;
        }
    } else if expects_expired {
        let start = r.server.store().current_rv();
        r.ensure(&json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "filler", "namespace": "default"}})).await;
        r.server.store().compact();
        path = set_query(&path, "resourceVersion", &start.to_string());
    } else {
        // The object exists before the watch starts if its first event is not its creation.
        if let Some(first) = want_events.first()
            && first["type"] != "ADDED"
        {
            r.ensure(&first["object"]).await;
        }
        let from = r.server.store().current_rv();
        for e in &want_events {
            let obj = &e["object"];
            match e["type"].as_str().unwrap() {
                "ADDED" => {
                    r.admin_json("POST", &collection_path(obj), Some(&client_side(obj)))
                        .await;
                }
                "MODIFIED" => {
                    r.replace(obj).await;
                }
                "DELETED" => {
                    let p = format!(
                        "{}/{}",
                        collection_path(obj),
                        obj["metadata"]["name"].as_str().unwrap()
                    );
                    r.admin_json("DELETE", &p, None).await;
                }
                other => panic!("cannot reproduce a {other} event"),
            }
        }
        path = set_query(&path, "resourceVersion", &from.to_string());
    }

    let client = r.client_for(req["auth"].as_str(), &t["response"]).await;
    let (status, ct, resp) = r.send(&client, "GET", &path, None, None).await;
    let mut problems = Vec::new();
    let want_status = t["response"]["status"].as_u64().unwrap_or(200) as u16;
    if status != want_status {
        problems.push(format!("status: expected {want_status}, got {status}"));
    }
    if let Some(want_ct) = t["response"]["content_type"].as_str()
        && ct != want_ct
    {
        problems.push(format!("content-type: expected {want_ct}, got {ct}"));
    }
    // Read event lines until we have as many as expected, then make sure no extra one follows.
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut lines: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let settle = Duration::from_millis(300);
    loop {
        let wait = if lines.len() >= want_events.len() {
            settle
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    buf.extend_from_slice(data);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        lines.push(
                            serde_json::from_slice(&line).expect("every watch line is one JSON object"),
                        );
                    }
                }
            }
            Ok(Some(Err(e))) => {
                problems.push(format!("stream error: {e}"));
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if lines.len() != want_events.len() {
        problems.push(format!(
            "events: expected {}, got {}: {lines:?}",
            want_events.len(),
            lines.len()
        ));
    }
    for (i, (want, got)) in want_events.iter().zip(&lines).enumerate() {
        let mut want = want.clone();
        let mut got = got.clone();
        if expects_expired {
            // The message names version numbers; compare the rest.
            want["object"].as_object_mut().map(|o| o.remove("message"));
            got["object"].as_object_mut().map(|o| o.remove("message"));
        }
        diff(&want, &got, &format!("event[{i}]"), &mut problems);
    }
    problems
}

/// Replays every transcript in `dir`; returns how many, and the differences found.
async fn replay_folder(dir: &Path, with_admission_context: bool) -> (usize, Vec<String>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let transcripts: Vec<(PathBuf, Value)> = files
        .into_iter()
        .map(|f| {
            let t = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            (f, t)
        })
        .collect();
    let setup: Vec<Value> = if with_admission_context {
        transcripts
            .iter()
            .map(|(_, t)| t)
            .filter(|t| creates_admission_config(t) && t["response"]["status"] == 201)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let mut replayed = 0;
    let mut failures = Vec::new();
    for (file, t) in &transcripts {
        let Some(req) = t.get("request") else {
            continue; // records, not a request (client-go-records.json: see the interop tests)
        };
        let is_watch = req["path"].as_str().is_some_and(|p| p.contains("watch=true"));
        let problems = if is_watch {
            replay_watch(t).await
        } else {
            replay_request(t, &setup).await
        };
        replayed += 1;
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", file.display(), problems.join("\n  ")));
        }
    }
    (replayed, failures)
}

#[tokio::test]
async fn every_transcript_replays_like_the_real_server() {
    let dir = transcripts_dir();
    let (replayed, failures) = replay_folder(&dir, false).await;
    assert!(
        replayed >= 20,
        "only {replayed} transcripts found in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {replayed} transcripts differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("replayed {replayed} transcripts");
}

#[tokio::test]
async fn every_admission_transcript_replays_like_the_real_v1_32_server() {
    let dir = transcripts_dir().join("admission-v1.32");
    let (replayed, failures) = replay_folder(&dir, true).await;
    assert!(
        replayed >= 8,
        "only {replayed} transcripts found in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {replayed} transcripts differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("replayed {replayed} admission transcripts");
}
