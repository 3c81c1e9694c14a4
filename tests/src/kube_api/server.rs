//! HTTP handling of the test API server: routing, authentication, RBAC, faults, the verbs, and
//! watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::admission::{self, Admission, Review};
use super::resources::{
    self, ALL, GROUPS, NAMESPACES, PODS, Resource, VALIDATING_ADMISSION_POLICIES,
    VALIDATING_ADMISSION_POLICY_BINDINGS,
};
use super::selector::Selector;
use super::store::{ChangeType, ObjectKey, Replay, StoreError, metadata_mut};
use super::{InjectedError, LogEntry, Shared, User};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// What a path names.
#[derive(Debug)]
enum Route {
    Version,
    ApiVersions,
    ApiGroups,
    Group(&'static str),
    ResourceList(&'static str),
    /// `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`: who am I.
    SelfSubjectReview,
    Objects {
        resource: &'static Resource,
        namespace: Option<String>,
        name: Option<String>,
    },
    Unknown,
}

fn find_resource(group: &str, plural: &str) -> Option<&'static Resource> {
    ALL.iter()
        .copied()
        .find(|r| r.group == group && r.plural == plural)
}

fn known_group(group: &str) -> Option<&'static str> {
    GROUPS.iter().copied().find(|g| *g == group)
}

fn route(path: &str) -> Route {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["version"] => return Route::Version,
        ["api"] => return Route::ApiVersions,
        ["apis"] => return Route::ApiGroups,
        ["api", "v1"] => return Route::ResourceList(""),
        ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] => return Route::SelfSubjectReview,
        ["apis", g] => return known_group(g).map_or(Route::Unknown, Route::Group),
        ["apis", g, "v1"] => return known_group(g).map_or(Route::Unknown, Route::ResourceList),
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, "v1", rest @ ..] => match known_group(g) {
            Some(g) => (g, rest),
            None => return Route::Unknown,
        },
        _ => return Route::Unknown,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        [plural, name] => (None, *plural, Some(name.to_string())),
        [plural] => (None, *plural, None),
        _ => return Route::Unknown,
    };
    // Only namespaced resources live under a namespace, only cluster-scoped ones outside one
    // (a list across namespaces aside).
    if let Some(r) = find_resource(group, plural)
        && r.namespaced != namespace.is_some()
        && !(r.namespaced && name.is_none())
    {
        return Route::Unknown;
    }
    match find_resource(group, plural) {
        Some(resource) => Route::Objects {
            resource,
            namespace,
            name,
        },
        None => Route::Unknown,
    }
}

pub(super) fn json_response(status: u16, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(serde_json::to_vec(body).unwrap_or_default()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(super) fn status_response(body: &Value) -> Response {
    let code = body["code"].as_u64().unwrap_or(500) as u16;
    json_response(code, body)
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

struct Ctx {
    shared: Arc<Shared>,
    user: String,
    verb: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    path: String,
    at: Instant,
    wall: SystemTime,
}

impl Ctx {
    fn log(&self, status: u16) {
        let entry = LogEntry {
            user: self.user.clone(),
            verb: self.verb.clone(),
            resource: self.resource.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            path: self.path.clone(),
            status,
            at: self.at,
            wall: self.wall,
            duration: self.at.elapsed(),
        };
        tracing::debug!(user = %entry.user, verb = %entry.verb, path = %entry.path, status, "request");
        self.shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let at = Instant::now();
    let wall = SystemTime::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let query = query_map(uri.query());
    let headers = req.headers().clone();
    let route = route(&path);

    // No token: `system:anonymous`, if the test let anonymous requests in (registered as "").
    let token = bearer_token(&headers).unwrap_or_default();
    let user: Option<User> = shared
        .users
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(token)
        .cloned();

    let (verb, resource_name, namespace, name) = match &route {
        Route::Objects {
            resource,
            namespace,
            name,
        } => {
            let verb = match (&method, name.is_some()) {
                (&Method::GET, true) => "get",
                (&Method::GET, false) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                    "watch"
                }
                (&Method::GET, false) => "list",
                (&Method::POST, false) => "create",
                (&Method::PUT, true) => "update",
                (&Method::PATCH, true) => "patch",
                (&Method::DELETE, true) => "delete",
                (&Method::DELETE, false) => "deletecollection",
                _ => "unsupported",
            };
            (verb, resource.plural.to_string(), namespace.clone(), name.clone())
        }
        Route::SelfSubjectReview if method == Method::POST => {
            ("create", "selfsubjectreviews".to_string(), None, None)
        }
        _ => ("discovery", String::new(), None, None),
    };
    let ctx = Ctx {
        shared: shared.clone(),
        user: user.as_ref().map(|u| u.name.clone()).unwrap_or_default(),
        verb: verb.to_string(),
        resource: resource_name,
        namespace,
        name,
        path: uri.to_string(),
        at,
        wall,
    };

    // Discovery is open to everyone, as `system:discovery` makes it on a real cluster.
    if ctx.verb != "discovery" && user.is_none() {
        ctx.log(401);
        return status_response(&resources::unauthorized());
    }

    // Faults: latency, then a partition (hang until healed), then injected errors.
    if !ctx.user.is_empty() || ctx.verb == "discovery" {
        let faults = shared.faults_of(&ctx.user);
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        let mut changed = shared.fault_changed.subscribe();
        while shared.is_held(&ctx.user) {
            if changed.changed().await.is_err() {
                break;
            }
        }
        let faults = shared.faults_of(&ctx.user);
        if faults.error_rate > 0.0 && rand::random::<f64>() < faults.error_rate {
            let (body, retry_after) = match faults.error {
                InjectedError::Internal => (
                    resources::status(
                        500,
                        "InternalError",
                        "Internal error occurred: injected fault",
                        None,
                    ),
                    None,
                ),
                InjectedError::Unavailable => (
                    resources::status(
                        503,
                        "ServiceUnavailable",
                        "the server is currently unable to handle the request",
                        None,
                    ),
                    None,
                ),
                InjectedError::TooManyRequests { retry_after_seconds } => (
                    resources::status(
                        429,
                        "TooManyRequests",
                        "Too many requests, please try again later.",
                        Some(json!({"retryAfterSeconds": retry_after_seconds})),
                    ),
                    Some(retry_after_seconds),
                ),
            };
            ctx.log(body["code"].as_u64().unwrap_or(500) as u16);
            let mut resp = status_response(&body);
            if let Some(secs) = retry_after
                && let Ok(v) = HeaderValue::from_str(&secs.to_string())
            {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
    }

    let body = match axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => {
            ctx.log(400);
            return status_response(&resources::bad_request(format!("reading the body: {e}")));
        }
    };

    let resp = match route {
        Route::Objects { resource, .. } => {
            let user = user.expect("checked above");
            objects(&ctx, &user, resource, &method, &query, &headers, body).await
        }
        Route::SelfSubjectReview if ctx.verb == "create" => {
            self_subject_review(user.as_ref().expect("checked above"))
        }
        other => discovery(&shared, other),
    };
    // Watches log themselves when they start streaming.
    if ctx.verb != "watch" || resp.status() != StatusCode::OK {
        ctx.log(resp.status().as_u16());
    }
    resp
}

fn discovery(shared: &Shared, route: Route) -> Response {
    let body = match route {
        Route::Version => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-elector-test",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"
        }),
        Route::ApiVersions => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]
        }),
        Route::ApiGroups => json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": GROUPS.iter().map(|g| group_info(g)).collect::<Vec<_>>()
        }),
        Route::Group(group) => {
            let mut g = group_info(group);
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        }
        Route::ResourceList(group) => {
            let resources: Vec<Value> = ALL
                .iter()
                .filter(|r| r.group == group)
                .map(|r| {
                    json!({
                        "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
                        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                        "shortNames": r.short_names,
                    })
                })
                .collect();
            let gv = if group.is_empty() {
                "v1".to_string()
            } else {
                format!("{group}/v1")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
        }
        Route::Objects { .. } | Route::SelfSubjectReview | Route::Unknown => {
            return status_response(&resources::status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                Some(json!({})),
            ));
        }
    };
    json_response(200, &body)
}

fn group_info(group: &str) -> Value {
    json!({
        "name": group,
        "versions": [{"groupVersion": format!("{group}/v1"), "version": "v1"}],
        "preferredVersion": {"groupVersion": format!("{group}/v1"), "version": "v1"}
    })
}

fn key(resource: &Resource, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        resource: resource.plural,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

/// Puts `kind` and `apiVersion` first-class on a stored object.
fn with_type(resource: &Resource, mut object: Value) -> Value {
    if let Some(map) = object.as_object_mut() {
        map.insert("kind".into(), json!(resource.kind));
        map.insert("apiVersion".into(), json!(resource.api_version()));
    }
    object
}

/// Where an object of `resource` lives: the request's namespace, or "" when cluster-scoped.
#[allow(clippy::result_large_err)]
fn object_namespace<'a>(resource: &Resource, namespace: Option<&'a str>) -> Result<&'a str, Response> {
    if !resource.namespaced {
        return Ok("");
    }
    namespace.ok_or_else(|| status_response(&resources::bad_request("a namespace is required")))
}

/// Where a single object of `resource` lives and its name, for the verbs that name one (get,
/// update, patch, delete): a request without them is a 400, as from the real API server.
#[allow(clippy::result_large_err)]
fn namespace_and_name<'a>(
    resource: &Resource,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
) -> Result<(&'a str, &'a str), Response> {
    let ns = object_namespace(resource, namespace)?;
    let name = name.ok_or_else(|| status_response(&resources::bad_request("a name is required")))?;
    Ok((ns, name))
}

/// The object in a create or update body, placed in `ns` (which its own namespace, if it
/// names one, must be).
#[allow(clippy::result_large_err)]
fn body_object(resource: &Resource, body: &Bytes, ns: &str) -> Result<Value, Response> {
    let mut obj = parse_body(body)?;
    if resource.namespaced
        && let Some(r) = check_namespace(&mut obj, ns)
    {
        return Err(r);
    }
    Ok(obj)
}

fn is_admission_config(resource: &Resource) -> bool {
    std::ptr::eq(resource, &VALIDATING_ADMISSION_POLICIES)
        || std::ptr::eq(resource, &VALIDATING_ADMISSION_POLICY_BINDINGS)
}

/// Validation beyond names: a policy's CEL must compile, a binding must name a policy and
/// actions.
fn validate_kind(resource: &Resource, object: &Value) -> Vec<resources::FieldError> {
    if std::ptr::eq(resource, &VALIDATING_ADMISSION_POLICIES) {
        admission::compile_policy(object).err().unwrap_or_default()
    } else if std::ptr::eq(resource, &VALIDATING_ADMISSION_POLICY_BINDINGS) {
        admission::validate_binding(object)
    } else {
        Vec::new()
    }
}

/// What the server sets on a written object of some kinds: a namespace's name label, finalizer
/// and phase; a policy's or binding's defaults and `generation` (bumped when the spec changes).
fn server_defaults(resource: &Resource, object: &mut Value, old: Option<&Value>) {
    if std::ptr::eq(resource, &NAMESPACES) {
        let name = object["metadata"]["name"].clone();
        let meta = metadata_mut(object);
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        labels[admission::NAMESPACE_NAME_LABEL] = name;
        if object["spec"]["finalizers"].is_null() {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        object["status"] = json!({"phase": "Active"});
    } else if is_admission_config(resource) {
        let generation = match old {
            None => 1,
            Some(old) => {
                let previous = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let mut defaulted = object.clone();
                admission::apply_defaults(resource, &mut defaulted, previous);
                if defaulted["spec"] == old["spec"] {
                    previous
                } else {
                    previous + 1
                }
            }
        };
        admission::apply_defaults(resource, object, generation);
    }
}

async fn objects(
    ctx: &Ctx,
    user: &User,
    resource: &'static Resource,
    method: &Method,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let namespace = ctx.namespace.as_deref();
    let name = ctx.name.as_deref();
    if ctx.verb == "unsupported" {
        return status_response(&resources::status(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            Some(json!({})),
        ));
    }
    if !user
        .rules
        .iter()
        .any(|r| r.allows(&ctx.verb, resource.group, resource.plural, namespace))
    {
        return status_response(&resources::forbidden(
            resource, &user.name, &ctx.verb, namespace, name,
        ));
    }
    let store = &ctx.shared.store;
    if let Some(answer) =
        super::events::serve(store, resource, &ctx.verb, namespace, name, query, headers, &body)
    {
        return answer;
    }
    // Writes to namespaced objects pass through the admission policies.
    let admission = |ns: &str| {
        resource
            .namespaced
            .then(|| Admission::prepare(store, &ctx.shared.policies, ns))
    };
    fn review<'a>(
        resource: &'static Resource,
        user: &'a User,
        operation: &'static str,
        (name, namespace): (&'a str, &'a str),
        object: Option<&'a Value>,
        old_object: Option<&'a Value>,
    ) -> Review<'a> {
        Review {
            resource,
            operation,
            name,
            namespace,
            user,
            object,
            old_object,
        }
    }
    match ctx.verb.as_str() {
        "get" => {
            let (ns, name) = match namespace_and_name(resource, namespace, name) {
                Ok(found) => found,
                Err(r) => return r,
            };
            match store.get(&key(resource, ns, name)) {
                Some(obj) => json_response(200, &with_type(resource, obj)),
                None => status_response(&resources::not_found(resource, name)),
            }
        }
        "list" => {
            let selector = match Selector::parse(
                query.get("fieldSelector").map(String::as_str),
                query.get("labelSelector").map(String::as_str),
            ) {
                Ok(s) => s,
                Err(e) => return status_response(&resources::bad_request(e)),
            };
            let (items, rv) = store.list(resource, namespace);
            let items: Vec<Value> = items
                .into_iter()
                .filter(|o| selector.matches(o))
                .map(|mut o| {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    o
                })
                .collect();
            json_response(
                200,
                &json!({
                    "kind": format!("{}List", resource.kind),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            )
        }
        "watch" => watch(ctx, resource, query),
        "create" => {
            let ns = match object_namespace(resource, namespace) {
                Ok(ns) => ns,
                Err(r) => return r,
            };
            let mut obj = match body_object(resource, &body, ns) {
                Ok(o) => o,
                Err(r) => return r,
            };
            let obj_name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let mut errors = resources::validate(resource, &obj, false);
            errors.extend(validate_kind(resource, &obj));
            if !errors.is_empty() {
                return status_response(&resources::invalid(resource, &obj_name, &errors));
            }
            if std::ptr::eq(resource, &PODS) {
                resources::default_pod(&mut obj);
            }
            server_defaults(resource, &mut obj, None);
            let obj = with_type(resource, obj);
            if let Some(a) = admission(ns)
                && let Err(denied) = a.review(&review(
                    resource,
                    user,
                    "CREATE",
                    (&obj_name, ns),
                    Some(&obj),
                    None,
                ))
            {
                return status_response(&denied);
            }
            match store.create(resource, key(resource, ns, &obj_name), obj) {
                Ok(o) => json_response(201, &o),
                Err(_) => status_response(&resources::already_exists(resource, &obj_name)),
            }
        }
        "update" => {
            let (ns, name) = match namespace_and_name(resource, namespace, name) {
                Ok(found) => found,
                Err(r) => return r,
            };
            let obj = match body_object(resource, &body, ns) {
                Ok(o) => o,
                Err(r) => return r,
            };
            let body_name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if body_name != name {
                return status_response(&resources::bad_request(format!(
                    "the name of the object ({body_name}) does not match the name on the URL ({name})"
                )));
            }
            let mut errors = resources::validate(resource, &obj, true);
            errors.extend(validate_kind(resource, &obj));
            if !errors.is_empty() {
                return status_response(&resources::invalid(resource, name, &errors));
            }
            let expected = obj["metadata"]["resourceVersion"].as_str().map(str::to_string);
            let obj = with_type(resource, obj);
            let admission = admission(ns);
            let k = key(resource, ns, name);
            // The object is reviewed against the version it replaces: an unconditional replace
            // is made conditional on the version reviewed, and retried if that changed.
            loop {
                let old = store.get(&k);
                if old.is_none() && expected.is_some() {
                    return status_response(&resources::not_found(resource, name));
                }
                let mut new = obj.clone();
                server_defaults(resource, &mut new, old.as_ref());
                let operation = if old.is_some() { "UPDATE" } else { "CREATE" };
                if let Some(a) = &admission
                    && let Err(denied) = a.review(&review(
                        resource,
                        user,
                        operation,
                        (name, ns),
                        Some(&new),
                        old.as_ref(),
                    ))
                {
                    return status_response(&denied);
                }
                let result = match &old {
                    // Endpoints and Leases allow create-on-update when no version is given.
                    None => store.create(resource, k.clone(), new).map(|o| (201, o)),
                    Some(old) => {
                        let seen = old["metadata"]["resourceVersion"].as_str().map(str::to_string);
                        let cas = expected.clone().or(seen);
                        store
                            .replace(resource, k.clone(), cas.as_deref(), new)
                            .map(|o| (200, o))
                    }
                };
                match result {
                    Ok((code, o)) => return json_response(code, &o),
                    Err(StoreError::Conflict) if expected.is_some() => {
                        return status_response(&resources::conflict(resource, name));
                    }
                    // Changed (or created, or deleted) since it was reviewed: review again.
                    Err(StoreError::Conflict | StoreError::AlreadyExists | StoreError::NotFound)
                        if expected.is_none() => {}
                    Err(StoreError::Rejected(status)) => return status_response(&status),
                    Err(_) => return status_response(&resources::not_found(resource, name)),
                }
            }
        }
        "patch" => {
            let (ns, name) = match namespace_and_name(resource, namespace, name) {
                Ok(found) => found,
                Err(r) => return r,
            };
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let ct = content_type.split(';').next().unwrap_or_default().trim();
            if ct != "application/merge-patch+json" && ct != "application/strategic-merge-patch+json" {
                return status_response(&resources::status(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
                    ),
                    Some(json!({})),
                ));
            }
            let patch = match parse_body(&body) {
                Ok(p) => p,
                Err(r) => return r,
            };
            let admission = admission(ns);
            let result = store.update_with(resource, key(resource, ns, name), |old| {
                let mut new = old.clone();
                merge_patch(&mut new, &patch);
                let want = patch["metadata"]["resourceVersion"].as_str();
                if want.is_some() && want != old["metadata"]["resourceVersion"].as_str() {
                    return Err(StoreError::Conflict);
                }
                let errors = validate_kind(resource, &new);
                if !errors.is_empty() {
                    return Err(StoreError::Rejected(resources::invalid(resource, name, &errors)));
                }
                server_defaults(resource, &mut new, Some(old));
                if let Some(a) = &admission {
                    a.review(&review(
                        resource,
                        user,
                        "UPDATE",
                        (name, ns),
                        Some(&new),
                        Some(old),
                    ))
                    .map_err(StoreError::Rejected)?;
                }
                Ok(new)
            });
            match result {
                Ok(o) => json_response(200, &o),
                Err(StoreError::Conflict) => status_response(&resources::conflict(resource, name)),
                Err(StoreError::Rejected(status)) => status_response(&status),
                Err(_) => status_response(&resources::not_found(resource, name)),
            }
        }
        "delete" => {
            let (ns, name) = match namespace_and_name(resource, namespace, name) {
                Ok(found) => found,
                Err(r) => return r,
            };
            let k = key(resource, ns, name);
            if let Some(a) = admission(ns) {
                let Some(old) = store.get(&k) else {
                    return status_response(&resources::not_found(resource, name));
                };
                if let Err(denied) = a.review(&review(resource, user, "DELETE", (name, ns), None, Some(&old)))
                {
                    return status_response(&denied);
                }
            }
            match store.delete(resource, k) {
                Ok(o) => {
                    let mut details =
                        json!({"name": name, "kind": resource.plural, "uid": o["metadata"]["uid"]});
                    if !resource.group.is_empty() {
                        details["group"] = json!(resource.group);
                    }
                    json_response(
                        200,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                    )
                }
                Err(_) => status_response(&resources::not_found(resource, name)),
            }
        }
        _ => status_response(&resources::status(
            405,
            "MethodNotAllowed",
            format!("{} is not supported by the test API server", ctx.verb),
            Some(json!({})),
        )),
    }
}

/// `POST selfsubjectreviews`: the caller's user, groups and `extra`, as the authenticator saw
/// them.
fn self_subject_review(user: &User) -> Response {
    let mut info = json!({
        "username": user.name,
        "groups": admission::groups_of(user),
    });
    if !user.extra.is_empty() {
        info["extra"] = json!(user.extra);
    }
    json_response(
        201,
        &json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "SelfSubjectReview",
            "metadata": {"creationTimestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
            "status": {"userInfo": info},
        }),
    )
}

#[allow(clippy::result_large_err)]
pub(super) fn parse_body(body: &Bytes) -> Result<Value, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(status_response(&resources::bad_request(
            "the body must be a JSON object",
        ))),
        Err(e) => Err(status_response(&resources::bad_request(format!(
            "the body of the request could not be decoded: {e}"
        )))),
    }
}

/// Fills in the namespace from the path, or answers 400 when the body names another.
pub(super) fn check_namespace(obj: &mut Value, ns: &str) -> Option<Response> {
    let meta = metadata_mut(obj);
    match meta.get("namespace").and_then(Value::as_str) {
        Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
            Some(status_response(&resources::namespace_mismatch()))
        }
        _ => {
            meta.insert("namespace".into(), json!(ns));
            None
        }
    }
}

/// RFC 7386 JSON merge patch.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch(ctx: &Ctx, resource: &'static Resource, query: &HashMap<String, String>) -> Response {
    let selector = match Selector::parse(
        query.get("fieldSelector").map(String::as_str),
        query.get("labelSelector").map(String::as_str),
    ) {
        Ok(s) => s,
        Err(e) => return status_response(&resources::bad_request(e)),
    };
    let start_rv: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => match v.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                return status_response(&resources::bad_request(format!(
                    "invalid resource version {v:?}: strconv.ParseUint: parsing {v:?}: invalid syntax"
                )));
            }
        },
    };
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    ctx.log(200);

    let shared = ctx.shared.clone();
    let user = ctx.user.clone();
    let namespace = ctx.namespace.clone();
    let counted = shared.watches.start(
        &user,
        resource.plural,
        namespace.as_deref(),
        query.get("fieldSelector").map(String::as_str),
        query.get("labelSelector").map(String::as_str),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let counted = counted;
        let name_of = |o: &Value| o["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let store = &shared.store;
        let cut_at_start = shared.watch_cut_generation(&user);
        let in_scope = |o: &Value| {
            namespace
                .as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
        };
        let mut cursor = match start_rv {
            Some(rv) => rv,
            None => {
                let (items, rv) = store.list(resource, namespace.as_deref());
                for item in items.into_iter().filter(|o| selector.matches(o)) {
                    let name = name_of(&item);
                    if tx
                        .send(event_line("ADDED", &with_type(resource, item)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    counted.0.delivered(&name);
                }
                rv
            }
        };
        let mut latest = store.subscribe();
        let mut faults = shared.fault_changed.subscribe();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let bookmark_every = shared.options.bookmark_interval;
        let mut next_bookmark = tokio::time::Instant::now() + bookmark_every;
        loop {
            if shared.watch_cut_generation(&user) != cut_at_start {
                return;
            }
            if !shared.is_held(&user) {
                match store.changes_after(resource, cursor) {
                    Replay::Expired => {
                        let status = resources::status(
                            410,
                            "Expired",
                            format!("too old resource version: {cursor} ({})", store.current_rv()),
                            None,
                        );
                        if tx.send(event_line("ERROR", &status)).await.is_ok() {
                            counted.0.delivered("");
                        }
                        return;
                    }
                    Replay::Changes(changes, through) => {
                        for c in changes {
                            if !in_scope(&c.object) {
                                continue;
                            }
                            let kind = if selector.matches(&c.object) {
                                Some(c.kind.as_str())
                            } else if c.kind == ChangeType::Modified
                                && c.previous.as_ref().is_some_and(|p| selector.matches(p))
                            {
                                Some("DELETED")
                            } else {
                                None
                            };
                            if let Some(kind) = kind {
                                let name = name_of(&c.object);
                                if tx
                                    .send(event_line(kind, &with_type(resource, c.object)))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                counted.0.delivered(&name);
                            }
                        }
                        cursor = through;
                    }
                }
            }
            let sleep_until = match deadline {
                Some(d) => d.min(next_bookmark),
                None => next_bookmark,
            };
            tokio::select! {
                r = latest.changed() => if r.is_err() { return },
                r = faults.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(sleep_until) => {
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        return;
                    }
                    next_bookmark = tokio::time::Instant::now() + bookmark_every;
                    if bookmarks && !shared.is_held(&user) {
                        let bm = json!({"kind": resource.kind, "apiVersion": resource.api_version(),
                            "metadata": {"resourceVersion": cursor.to_string()}});
                        if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                            return;
                        }
                        counted.0.bookmark();
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::resources::{ENDPOINTS, LEASES};

    #[test]
    fn routes() {
        assert!(matches!(
            route("/api/v1/namespaces/demo/endpoints/x"),
            Route::Objects { name: Some(_), .. }
        ));
        assert!(
            matches!(route("/apis/coordination.k8s.io/v1/namespaces/d/leases"), Route::Objects { resource, name: None, .. } if std::ptr::eq(resource, &LEASES))
        );
        assert!(matches!(
            route("/api/v1/pods"),
            Route::Objects { namespace: None, .. }
        ));
        assert!(matches!(route("/api/v1/namespaces/d/secrets"), Route::Unknown));
        assert!(matches!(route("/api/v1"), Route::ResourceList("")));
        let _ = &ENDPOINTS;
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut t, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }
}
