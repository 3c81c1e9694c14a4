//! The resources the test API server serves, their `Status` bodies phrased exactly as a real
//! kube-apiserver phrases them, their validation and their defaulting.

use serde_json::{Value, json};

/// A served resource.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group ("" for core).
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub short_names: &'static [&'static str],
    /// Whether objects live in a namespace (`false`: cluster-scoped, stored under namespace "").
    pub namespaced: bool,
}

pub static ENDPOINTS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "endpoints",
    singular: "endpoints",
    kind: "Endpoints",
    short_names: &["ep"],
    namespaced: true,
};

pub static PODS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "pods",
    singular: "pod",
    kind: "Pod",
    short_names: &["po"],
    namespaced: true,
};

pub static LEASES: Resource = Resource {
    group: "coordination.k8s.io",
    version: "v1",
    plural: "leases",
    singular: "lease",
    kind: "Lease",
    short_names: &[],
    namespaced: true,
};

pub static NAMESPACES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "namespaces",
    singular: "namespace",
    kind: "Namespace",
    short_names: &["ns"],
    namespaced: false,
};

pub static VALIDATING_ADMISSION_POLICIES: Resource = Resource {
    group: "admissionregistration.k8s.io",
    version: "v1",
    plural: "validatingadmissionpolicies",
    singular: "validatingadmissionpolicy",
    kind: "ValidatingAdmissionPolicy",
    short_names: &[],
    namespaced: false,
};

pub static VALIDATING_ADMISSION_POLICY_BINDINGS: Resource = Resource {
    group: "admissionregistration.k8s.io",
    version: "v1",
    plural: "validatingadmissionpolicybindings",
    singular: "validatingadmissionpolicybinding",
    kind: "ValidatingAdmissionPolicyBinding",
    short_names: &[],
    namespaced: false,
};

pub static ALL: [&Resource; 8] = [
    &ENDPOINTS,
    &PODS,
    &LEASES,
    &NAMESPACES,
    &VALIDATING_ADMISSION_POLICIES,
    &VALIDATING_ADMISSION_POLICY_BINDINGS,
    &super::events::CORE_EVENTS,
    &super::events::EVENTS,
];

/// The API groups served besides core, with the resources of each listed in [`ALL`].
/// `authentication.k8s.io` serves only `selfsubjectreviews` (a create-only virtual resource).
pub static GROUPS: [&str; 4] = [
    "coordination.k8s.io",
    "admissionregistration.k8s.io",
    "authentication.k8s.io",
    "events.k8s.io",
];

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `endpoints` / `leases.coordination.k8s.io`, as messages name the resource.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Endpoints` / `Lease.coordination.k8s.io`, as validation messages name the kind.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_string()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `details` of a Status about this resource: `{group?, kind: <plural>, name?}`.
    fn details(&self, name: Option<&str>) -> Value {
        let mut d = serde_json::Map::new();
        if let Some(name) = name {
            d.insert("name".into(), json!(name));
        }
        if !self.group.is_empty() {
            d.insert("group".into(), json!(self.group));
        }
        d.insert("kind".into(), json!(self.plural));
        Value::Object(d)
    }
}

/// A `Status` body with the real server's field set.
pub fn status(code: u16, reason: &str, message: impl Into<String>, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

pub fn not_found(r: &Resource, name: &str) -> Value {
    status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", r.qualified_plural()),
        Some(r.details(Some(name))),
    )
}

pub fn already_exists(r: &Resource, name: &str) -> Value {
    status(
        409,
        "AlreadyExists",
        format!("{} \"{name}\" already exists", r.qualified_plural()),
        Some(r.details(Some(name))),
    )
}

pub fn conflict(r: &Resource, name: &str) -> Value {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            r.qualified_plural()
        ),
        Some(r.details(Some(name))),
    )
}

pub fn unauthorized() -> Value {
    status(401, "Unauthorized", "Unauthorized", None)
}

pub fn forbidden(r: &Resource, user: &str, verb: &str, namespace: Option<&str>, name: Option<&str>) -> Value {
    let subject = match name {
        Some(n) => format!("{} \"{n}\"", r.qualified_plural()),
        None => r.qualified_plural(),
    };
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    status(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
            r.plural, r.group
        ),
        Some(r.details(name)),
    )
}

/// A request refused by a ValidatingAdmissionPolicy: `reason` (the validation's, `Invalid` when
/// it names none) decides the code, the message is prefixed as admission errors are, and the
/// same text is the one cause.
pub fn admission_denied(r: &Resource, name: &str, reason: Option<&str>, message: &str) -> Value {
    let reason = reason.filter(|r| !r.is_empty()).unwrap_or("Invalid");
    let code = match reason {
        "Unauthorized" => 401,
        "Forbidden" => 403,
        "RequestEntityTooLarge" => 413,
        _ => 422,
    };
    let subject = if name.is_empty() {
        r.qualified_plural()
    } else {
        format!("{} \"{name}\"", r.qualified_plural())
    };
    let mut details = r.details((!name.is_empty()).then_some(name));
    details["causes"] = json!([{"message": message}]);
    status(
        code,
        reason,
        format!("{subject} is forbidden: {message}"),
        Some(details),
    )
}

pub fn bad_request(message: impl Into<String>) -> Value {
    status(400, "BadRequest", message, None)
}

pub fn namespace_mismatch() -> Value {
    bad_request("the namespace of the provided object does not match the namespace sent on the request")
}

/// One invalid field: `(field path, "Invalid value: ...: why")`.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub fn invalid(r: &Resource, name: &str, errors: &[FieldError]) -> Value {
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({"reason": "FieldValueInvalid", "message": e.message, "field": e.field}))
        .collect();
    let summary: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    let summary = if summary.len() == 1 {
        summary[0].clone()
    } else {
        format!("[{}]", summary.join(", "))
    };
    let mut details = json!({"name": name, "kind": r.kind, "causes": causes});
    if !r.group.is_empty() {
        details["group"] = json!(r.group);
    }
    status(
        422,
        "Invalid",
        format!("{} \"{name}\" is invalid: {summary}", r.qualified_kind()),
        Some(details),
    )
}

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// Validates an object as the real server's validation does for what we serve.
pub fn validate(r: &Resource, object: &Value, is_update: bool) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        });
    } else if !elector_client::protocol::is_dns1123_subdomain(name) {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: format!("Invalid value: \"{name}\": {DNS1123_SUBDOMAIN_MSG}"),
        });
    }
    if std::ptr::eq(r, &LEASES) {
        let spec = &object["spec"];
        if let Some(d) = spec.get("leaseDurationSeconds").and_then(Value::as_i64)
            && d <= 0
        {
            errors.push(FieldError {
                field: "spec.leaseDurationSeconds".into(),
                message: format!("Invalid value: {d}: must be greater than 0"),
            });
        }
        if let Some(t) = spec.get("leaseTransitions").and_then(Value::as_i64)
            && t < 0
        {
            errors.push(FieldError {
                field: "spec.leaseTransitions".into(),
                message: format!("Invalid value: {t}: must be greater than or equal to 0"),
            });
        }
        if is_update && object["metadata"].get("resourceVersion").is_none() {
            errors.push(FieldError {
                field: "metadata.resourceVersion".into(),
                message: "Invalid value: 0x0: must be specified for an update".into(),
            });
        }
    }
    errors
}

/// Fills in what the real server defaults on a new pod (defaulting plus the
/// DefaultTolerationSeconds admission plugin), and resets its status.
pub fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in containers {
            let image = c["image"].as_str().unwrap_or_default().to_string();
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split_once(':'))
                .map(|(_, t)| t.to_string());
            let policy = match tag.as_deref() {
                None | Some("latest") if !image.contains('@') => "Always",
                _ => "IfNotPresent",
            };
            set_default(c, "imagePullPolicy", json!(policy));
            set_default(c, "resources", json!({}));
            set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_default(c, "terminationMessagePolicy", json!("File"));
        }
    }
    for (k, v) in [
        ("dnsPolicy", json!("ClusterFirst")),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
        ("priority", json!(0)),
        ("restartPolicy", json!("Always")),
        ("schedulerName", json!("default-scheduler")),
        ("securityContext", json!({})),
        ("terminationGracePeriodSeconds", json!(30)),
    ] {
        set_default(spec, k, v);
    }
    let sa = spec
        .get("serviceAccountName")
        .or_else(|| spec.get("serviceAccount"))
        .cloned()
        .unwrap_or(json!("default"));
    spec["serviceAccountName"] = sa.clone();
    spec["serviceAccount"] = sa;
    if spec.get("tolerations").is_none() {
        spec["tolerations"] = json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ]);
    }
    pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
}

fn set_default(obj: &mut Value, key: &str, value: Value) {
    if obj.get(key).is_none()
        && let Some(map) = obj.as_object_mut()
    {
        map.insert(key.to_string(), value);
    }
}

/// The value of a field selector's field on an object (`metadata.name`, `metadata.namespace`,
/// `spec.nodeName`, `status.phase`), or `None` if the field is not selectable.
pub fn field_value<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    let v = match field {
        "metadata.name" => &object["metadata"]["name"],
        "metadata.namespace" => &object["metadata"]["namespace"],
        "spec.nodeName" => &object["spec"]["nodeName"],
        "status.phase" => &object["status"]["phase"],
        _ => return super::events::field_value(object, field),
    };
    Some(v.as_str().unwrap_or(""))
}
