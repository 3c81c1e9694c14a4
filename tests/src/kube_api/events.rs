//! Events, served as a real kube-apiserver serves them: `events.k8s.io/v1` and core/v1 `events`
//! are two views of the same stored objects (stored here in the `events.k8s.io/v1` shape).
//!
//! - create, get, list, patch (JSON merge / strategic merge, which are the same for Events),
//!   and update, in both API versions; watch and delete of `events.k8s.io/v1` go through the
//!   server's generic handling (the stored shape is theirs); a core/v1 watch is refused with a
//!   405 that says so;
//! - the field names of each version (`regarding`/`involvedObject`, `note`/`message`,
//!   `reportingController`/`reportingComponent`, `deprecatedSource`/`source`, ...) and the
//!   zero values Go's JSON encoding writes (`deprecatedSource: {}`, `deprecatedFirstTimestamp:
//!   null`, `reportingComponent: ""`, ...);
//! - `eventTime` and `series.lastObservedTime` stored as MicroTime (six fractional digits, UTC);
//! - validation as `ValidateEventCreate` / `ValidateEventUpdate`: the strict rules for
//!   `events.k8s.io/v1` writes (eventTime, type, series, no deprecated fields, immutable fields
//!   on update) and the legacy ones for both (reportingController, reportingInstance, action,
//!   reason, note size, namespace agreement);
//! - the field selectors of both (`regarding.*` / `involvedObject.*`, `reason`, `type`,
//!   `reportingController` / `reportingComponent`, `source`), which `kubectl describe` uses.
//!
//! Events pass no admission policy here (none of elector's matches them).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::resources::{self, FieldError, Resource};
use super::selector::Selector;
use super::server::{check_namespace, json_response, merge_patch, parse_body, status_response};
use super::store::{ObjectKey, Store, StoreError};

pub static EVENTS: Resource = Resource {
    group: "events.k8s.io",
    version: "v1",
    plural: "events",
    singular: "event",
    kind: "Event",
    short_names: &["ev"],
    namespaced: true,
};

pub static CORE_EVENTS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "events",
    singular: "event",
    kind: "Event",
    short_names: &["ev"],
    namespaced: true,
};

/// `events.k8s.io/v1` field ↔ core/v1 field.
const RENAMES: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

const REFERENCE_FIELDS: [&str; 7] = [
    "kind",
    "namespace",
    "name",
    "uid",
    "apiVersion",
    "resourceVersion",
    "fieldPath",
];

fn is_core(resource: &Resource) -> bool {
    std::ptr::eq(resource, &CORE_EVENTS)
}

/// Whether `resource` is one of the two views of Events.
pub fn is_event(resource: &Resource) -> bool {
    std::ptr::eq(resource, &EVENTS) || is_core(resource)
}

/// The value of an Event field selector's field on a stored Event, or `None` if the field is
/// not one of Events' (`metadata.*` are everyone's: see [`resources::field_value`]).
pub fn field_value<'a>(event: &'a Value, field: &str) -> Option<&'a str> {
    let v = if let Some(f) = field
        .strip_prefix("regarding.")
        .or_else(|| field.strip_prefix("involvedObject."))
    {
        if !REFERENCE_FIELDS.contains(&f) {
            return None;
        }
        &event["regarding"][f]
    } else {
        match field {
            "reason" => &event["reason"],
            "type" => &event["type"],
            "reportingController" | "reportingComponent" => &event["reportingController"],
            "source" => &event["deprecatedSource"]["component"],
            _ => return None,
        }
    };
    Some(v.as_str().unwrap_or(""))
}

fn rename(object: &Value, to_core: bool) -> Value {
    let Some(map) = object.as_object() else {
        return object.clone();
    };
    let mut out = Map::new();
    for (k, v) in map {
        let renamed = RENAMES.iter().find_map(|(v1, core)| match to_core {
            true if k == v1 => Some(*core),
            false if k == core => Some(*v1),
            _ => None,
        });
        out.insert(renamed.unwrap_or(k).to_string(), v.clone());
    }
    Value::Object(out)
}

/// A stored Event as `resource`'s version shows it, with `kind` and `apiVersion`.
fn view(resource: &Resource, stored: &Value) -> Value {
    let mut out = if is_core(resource) {
        let mut core = rename(stored, true);
        // Go writes these even when empty: structs and non-omitempty strings.
        for (field, zero) in [
            ("involvedObject", json!({})),
            ("source", json!({})),
            ("firstTimestamp", Value::Null),
            ("lastTimestamp", Value::Null),
            ("eventTime", Value::Null),
            ("reportingComponent", json!("")),
            ("reportingInstance", json!("")),
        ] {
            core.as_object_mut().map(|m| m.entry(field).or_insert(zero));
        }
        core
    } else {
        let mut v1 = stored.clone();
        for (field, zero) in [
            ("regarding", json!({})),
            ("deprecatedSource", json!({})),
            ("deprecatedFirstTimestamp", Value::Null),
            ("deprecatedLastTimestamp", Value::Null),
            ("eventTime", Value::Null),
        ] {
            v1.as_object_mut().map(|m| m.entry(field).or_insert(zero));
        }
        v1
    };
    if let Some(m) = out.as_object_mut() {
        m.insert("kind".into(), json!("Event"));
        m.insert("apiVersion".into(), json!(resource.api_version()));
    }
    out
}

/// How a time field failed to decode: the 400 the real server answers.
fn bad_time(field: &str, value: &Value) -> Value {
    resources::bad_request(format!(
        "Event in version \"v1\" cannot be handled as a Event: parsing time {value} as \"2006-01-02T15:04:05Z07:00\": cannot parse {value} as \"2006\" (field {field})"
    ))
}

fn parse_time(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// A request body (in `resource`'s version) in the stored shape: renamed, times normalized as
/// the server's decoding does, zero values dropped. `Err`: a 400 body.
fn to_stored(resource: &Resource, body: &Value) -> Result<Value, Value> {
    let mut object = if is_core(resource) {
        rename(body, false)
    } else {
        body.clone()
    };
    let Some(map) = object.as_object_mut() else {
        return Ok(object);
    };
    map.remove("kind");
    map.remove("apiVersion");
    let micro = |t: chrono::DateTime<chrono::Utc>| json!(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
    let secs = |t: chrono::DateTime<chrono::Utc>| json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
    for (field, micro_precision) in [
        ("eventTime", true),
        ("deprecatedFirstTimestamp", false),
        ("deprecatedLastTimestamp", false),
    ] {
        match map.get(field) {
            None => {}
            Some(Value::Null) => {
                map.remove(field);
            }
            Some(v) => {
                let t = parse_time(v).ok_or_else(|| bad_time(field, v))?;
                map.insert(field.into(), if micro_precision { micro(t) } else { secs(t) });
            }
        }
    }
    if let Some(series) = map.get_mut("series").and_then(Value::as_object_mut)
        && let Some(v) = series.get("lastObservedTime").cloned()
        && !v.is_null()
    {
        let t = parse_time(&v).ok_or_else(|| bad_time("series.lastObservedTime", &v))?;
        series.insert("lastObservedTime".into(), micro(t));
    }
    for field in ["deprecatedSource", "regarding"] {
        if map
            .get(field)
            .is_some_and(|v| v.as_object().is_some_and(Map::is_empty) || v.is_null())
        {
            map.remove(field);
        }
    }
    for field in [
        "deprecatedCount",
        "series",
        "related",
        "note",
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
        "type",
    ] {
        if map
            .get(field)
            .is_some_and(|v| v.is_null() || v == &json!(0) || v == &json!(""))
        {
            map.remove(field);
        }
    }
    Ok(object)
}

fn str_of<'a>(event: &'a Value, field: &str) -> &'a str {
    event[field].as_str().unwrap_or_default()
}

fn required(field: &str) -> FieldError {
    FieldError {
        field: field.into(),
        message: "Required value".into(),
    }
}

fn invalid(field: &str, value: &str, why: impl std::fmt::Display) -> FieldError {
    FieldError {
        field: field.into(),
        message: format!("Invalid value: {}: {why}", json!(value)),
    }
}

/// `[prefix/]name` as Kubernetes validates qualified names.
fn qualified_name_errors(field: &str, value: &str) -> Vec<FieldError> {
    let (prefix, name) = match value.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, value),
    };
    let mut errors = Vec::new();
    if let Some(p) = prefix
        && !elector_client::protocol::is_dns1123_subdomain(p)
    {
        errors.push(invalid(field, value, "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"));
    }
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let ends_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > 63 {
        errors.push(invalid(
            field,
            value,
            "name part must be no more than 63 characters",
        ));
    }
    if !chars_ok || !ends_ok {
        errors.push(invalid(field, value, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"));
    }
    errors
}

/// `ValidateEventCreate` (and the legacy checks every write passes) on a stored-shape Event
/// written through `resource` into namespace `ns`.
fn validate(resource: &Resource, event: &Value, ns: &str) -> Vec<FieldError> {
    let mut errors = resources::validate(resource, event, false);
    let core = is_core(resource);
    let regarding_ns = event["regarding"]["namespace"].as_str().unwrap_or_default();
    let mismatch = || {
        invalid(
            "involvedObject.namespace",
            regarding_ns,
            "does not match event.namespace",
        )
    };
    if event.get("eventTime").is_none() {
        let ok = if regarding_ns.is_empty() {
            ns.is_empty() || ns == "default"
        } else {
            ns == regarding_ns
        };
        if !ok {
            errors.push(mismatch());
        }
    } else {
        if regarding_ns.is_empty() && ns != "default" && ns != "kube-system" {
            errors.push(mismatch());
        }
        let controller_field = if core { "source" } else { "reportingController" };
        let controller = str_of(event, "reportingController");
        if controller.is_empty() {
            errors.push(required(controller_field));
        }
        errors.extend(qualified_name_errors(controller_field, controller));
        for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
            let v = str_of(event, field);
            if v.is_empty() {
                errors.push(required(field));
            }
            if v.len() > limit {
                errors.push(invalid(field, "", format!("can have at most {limit} characters")));
            }
        }
        if str_of(event, "note").len() > 1024 {
            errors.push(invalid("note", "", "can have at most 1024 characters"));
        }
    }
    if core {
        return errors;
    }
    // Strict rules for events.k8s.io/v1.
    if let Some(series) = event.get("series") {
        let count = series["count"].as_i64().unwrap_or(0);
        if count < 2 {
            errors.push(FieldError {
                field: "series.count".into(),
                message: format!("Invalid value: {count}: should be at least 2"),
            });
        }
        if series["lastObservedTime"].is_null() {
            errors.push(required("series.lastObservedTime"));
        }
    }
    if event.get("eventTime").is_none() {
        errors.push(required("eventTime"));
    }
    let t = str_of(event, "type");
    if t != "Normal" && t != "Warning" {
        errors.push(invalid("type", "", format!("has invalid value: {t}")));
    }
    for (field, internal) in [
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("deprecatedSource", "source"),
    ] {
        if event.get(field).is_some() {
            errors.push(invalid(internal, "", "needs to be unset"));
        }
    }
    errors
}

/// `ValidateEventUpdate` for `events.k8s.io/v1` writes: what may not change.
fn immutable_errors(resource: &Resource, new: &Value, old: &Value) -> Vec<FieldError> {
    if is_core(resource) {
        return Vec::new();
    }
    [
        ("regarding", "involvedObject"),
        ("reason", "reason"),
        ("note", "message"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("type", "type"),
        ("eventTime", "eventTime"),
        ("action", "action"),
        ("related", "related"),
        ("reportingController", "reportingController"),
        ("reportingInstance", "reportingInstance"),
    ]
    .into_iter()
    .filter(|(field, _)| new.get(*field) != old.get(*field))
    .map(|(field, internal)| FieldError {
        field: internal.into(),
        message: format!(
            "Invalid value: {}: field is immutable",
            new.get(field).unwrap_or(&Value::Null)
        ),
    })
    .collect()
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey {
        resource: EVENTS.plural,
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

/// Answers a request about Events through `resource` (either view), or `None` for what the
/// server's generic handling serves (watch and delete of `events.k8s.io/v1`, delete of
/// core/v1). RBAC has been checked.
///
/// The request-scoped closures answer `Err(response)` early, as the server's handlers do.
#[allow(clippy::too_many_arguments, clippy::result_large_err)]
pub(super) fn serve(
    store: &Store,
    resource: &'static Resource,
    verb: &str,
    namespace: Option<&str>,
    name: Option<&str>,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Response> {
    if !is_event(resource) {
        return None;
    }
    let need_ns =
        || namespace.ok_or_else(|| status_response(&resources::bad_request("a namespace is required")));
    let need_name = || name.ok_or_else(|| status_response(&resources::bad_request("a name is required")));
    let answer = match verb {
        "get" => (|| {
            let (ns, name) = (need_ns()?, need_name()?);
            Ok(match store.get(&key(ns, name)) {
                Some(e) => json_response(200, &view(resource, &e)),
                None => status_response(&resources::not_found(resource, name)),
            })
        })(),
        "list" => (|| {
            let selector = Selector::parse(
                query.get("fieldSelector").map(String::as_str),
                query.get("labelSelector").map(String::as_str),
            )
            .map_err(|e| status_response(&resources::bad_request(e)))?;
            let (items, rv) = store.list(&EVENTS, namespace);
            let items: Vec<Value> = items
                .iter()
                .filter(|e| selector.matches(e))
                .map(|e| {
                    let mut item = view(resource, e);
                    if let Some(m) = item.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    item
                })
                .collect();
            Ok(json_response(
                200,
                &json!({
                    "kind": "EventList",
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            ))
        })(),
        "create" => (|| {
            let ns = need_ns()?;
            let mut body = parse_body(body)?;
            if let Some(r) = check_namespace(&mut body, ns) {
                return Err(r);
            }
            let event = to_stored(resource, &body).map_err(|s| status_response(&s))?;
            let event_name = event["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let errors = validate(resource, &event, ns);
            if !errors.is_empty() {
                return Err(status_response(&resources::invalid(
                    resource,
                    &event_name,
                    &errors,
                )));
            }
            let mut event = event;
            if let Some(m) = event.as_object_mut() {
                m.insert("kind".into(), json!("Event"));
                m.insert("apiVersion".into(), json!(EVENTS.api_version()));
            }
            Ok(match store.create(&EVENTS, key(ns, &event_name), event) {
                Ok(stored) => json_response(201, &view(resource, &stored)),
                Err(_) => status_response(&resources::already_exists(resource, &event_name)),
            })
        })(),
        "patch" | "update" => (|| {
            let (ns, name) = (need_ns()?, need_name()?);
            let input = parse_body(body)?;
            if verb == "patch" {
                let content_type = headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let ct = content_type.split(';').next().unwrap_or_default().trim();
                if ct != "application/merge-patch+json" && ct != "application/strategic-merge-patch+json" {
                    return Err(status_response(&resources::status(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
                        ),
                        Some(json!({})),
                    )));
                }
            } else if input["metadata"]["name"].as_str() != Some(name) {
                return Err(status_response(&resources::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    input["metadata"]["name"].as_str().unwrap_or_default()
                ))));
            }
            let result = store.update_with(&EVENTS, key(ns, name), |old| {
                let want = input["metadata"]["resourceVersion"].as_str();
                if want.is_some() && want != old["metadata"]["resourceVersion"].as_str() {
                    return Err(StoreError::Conflict);
                }
                // The change is made to the object as this version shows it.
                let mut new = view(resource, old);
                if verb == "patch" {
                    merge_patch(&mut new, &input);
                } else {
                    new = input.clone();
                }
                let mut new = to_stored(resource, &new).map_err(StoreError::Rejected)?;
                let mut errors = validate(resource, &new, ns);
                errors.retain(|e| e.field != "metadata.resourceVersion");
                errors.extend(immutable_errors(resource, &new, old));
                if !errors.is_empty() {
                    return Err(StoreError::Rejected(resources::invalid(resource, name, &errors)));
                }
                if let Some(m) = new.as_object_mut() {
                    m.insert("kind".into(), json!("Event"));
                    m.insert("apiVersion".into(), json!(EVENTS.api_version()));
                }
                Ok(new)
            });
            Ok(match result {
                Ok(stored) => json_response(200, &view(resource, &stored)),
                Err(StoreError::Conflict) => status_response(&resources::conflict(resource, name)),
                Err(StoreError::Rejected(status)) => status_response(&status),
                Err(_) => status_response(&resources::not_found(resource, name)),
            })
        })(),
        "watch" if is_core(resource) => Ok(status_response(&resources::status(
            405,
            "MethodNotAllowed",
            "the test API server serves watches of events through events.k8s.io/v1 only",
            Some(json!({})),
        ))),
        _ => return None,
    };
    Some(answer.unwrap_or_else(|r| r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Value {
        json!({
            "metadata": {"name": "job.1", "namespace": "demo"},
            "eventTime": "2026-01-01T00:00:00.123Z",
            "regarding": {"kind": "Lease", "namespace": "demo", "name": "job", "uid": "u1"},
            "reason": "LeaderElection", "action": "BecameLeader", "type": "Normal",
            "note": "pod-a became leader",
            "reportingController": "elector.dev/electord", "reportingInstance": "n1",
        })
    }

    #[test]
    fn both_views_of_one_event() {
        let stored = to_stored(&EVENTS, &event()).unwrap();
        assert_eq!(stored["eventTime"], "2026-01-01T00:00:00.123000Z");
        assert!(validate(&EVENTS, &stored, "demo").is_empty());
        let core = view(&CORE_EVENTS, &stored);
        assert_eq!(core["involvedObject"]["name"], "job");
        assert_eq!(core["message"], "pod-a became leader");
        assert_eq!(core["reportingComponent"], "elector.dev/electord");
        assert_eq!(core["source"], json!({}));
        assert_eq!(core["firstTimestamp"], Value::Null);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(to_stored(&CORE_EVENTS, &core).unwrap(), stored, "a round trip");
        let v1 = view(&EVENTS, &stored);
        assert_eq!(v1["deprecatedSource"], json!({}));
        assert_eq!(v1["apiVersion"], "events.k8s.io/v1");
        for (field, want) in [
            ("involvedObject.name", "job"),
            ("regarding.uid", "u1"),
            ("involvedObject.kind", "Lease"),
            ("reason", "LeaderElection"),
            ("reportingComponent", "elector.dev/electord"),
        ] {
            assert_eq!(field_value(&stored, field), Some(want), "{field}");
        }
        assert_eq!(field_value(&stored, "regarding.bogus"), None);
    }

    #[test]
    fn strict_validation_of_events_k8s_io() {
        let mut e = to_stored(&EVENTS, &event()).unwrap();
        e.as_object_mut().unwrap().remove("eventTime");
        e["type"] = json!("Odd");
        e["series"] = json!({"count": 1, "lastObservedTime": "2026-01-01T00:00:01.000000Z"});
        e["deprecatedCount"] = json!(3);
        let fields: Vec<String> = validate(&EVENTS, &e, "demo")
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["series.count", "eventTime", "type", "count"]);
        let mut e = to_stored(&EVENTS, &event()).unwrap();
        e["reportingController"] = json!("not a name");
        e["action"] = json!("");
        let fields: Vec<String> = validate(&EVENTS, &e, "demo")
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["reportingController", "action"]);
        // The core view keeps to the legacy checks.
        let mut legacy = to_stored(&EVENTS, &event()).unwrap();
        legacy.as_object_mut().unwrap().remove("eventTime");
        legacy["regarding"]["namespace"] = json!("other");
        let fields: Vec<String> = validate(&CORE_EVENTS, &legacy, "demo")
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["involvedObject.namespace"]);
    }

    #[test]
    fn only_the_series_may_change() {
        let old = to_stored(&EVENTS, &event()).unwrap();
        let mut new = old.clone();
        new["series"] = json!({"count": 2, "lastObservedTime": "2026-01-01T00:00:05.000000Z"});
        assert!(immutable_errors(&EVENTS, &new, &old).is_empty());
        new["note"] = json!("changed");
        let errors = immutable_errors(&EVENTS, &new, &old);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "message");
        assert!(immutable_errors(&CORE_EVENTS, &new, &old).is_empty());
    }
}
