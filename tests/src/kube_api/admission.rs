//! ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) for the test API server: policies
//! and bindings are stored like any object; every create, update, patch and delete of a
//! namespaced object passes through the bound policies' CEL validations before it is stored.
//!
//! What a real v1.32 kube-apiserver does and this module does too
//! (`shared/kube-api-transcripts/admission-v1.32/`):
//! - a policy's CEL is compiled and type-checked when the policy is created or replaced; an
//!   expression that does not type-check answers 422 naming the field, the expression and the
//!   compiler's message (`compilation failed: ERROR: <input>:L:C: ...`);
//! - a request is checked by each binding whose policy's `matchConstraints` and whose own
//!   `matchResources` (resource rules, operations, namespace selector) select it and whose
//!   policy's `matchConditions` all hold; the first failing validation of a binding with the
//!   `Deny` action refuses it, with the validation's `reason` as the status (403 for
//!   `Forbidden`, 422 when none is given) and the message
//!   `<resource> "<name>" is forbidden: ValidatingAdmissionPolicy '<policy>' with binding
//!   '<binding>' denied request: <message>`;
//! - the variables are `object` (null on delete), `oldObject` (null on create), `request`
//!   (`operation`, `name`, `namespace`, `kind`, `resource`, `userInfo` with `username`, `groups`
//!   and `extra`), `namespaceObject`, `params` (always null: `paramKind` is not supported) and
//!   `variables` (the policy's `spec.variables`, in order);
//! - an expression that fails at run time is a failure under `failurePolicy: Fail` (the default)
//!   and is ignored under `Ignore`.
//!
//! The type checker knows `request`, `namespaceObject` and the `metadata` of `object` and
//! `oldObject` exactly (an unknown field there is an error, as it is on a real server); every
//! other field of an object is `dyn`, so an expression over those fails only at run time. The
//! functions it checks are CEL's operators, `size`, `string`, the conversions, `in`, indexing,
//! and the strings extension's members; other functions are evaluated but not type-checked.
//!
//! Namespaces need not be created before use (unlike a real cluster): a namespace that was never
//! created is, to `namespaceObject` and namespace selectors, a namespace carrying only the
//! `kubernetes.io/metadata.name` label every namespace gets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

use cel::common::ast::{Expr, LiteralValue};
use cel::{Context, Env, IdedExpr, Program};
use serde_json::{Value, json};

use super::User;
use super::resources::{
    self, FieldError, NAMESPACES, Resource, VALIDATING_ADMISSION_POLICIES,
    VALIDATING_ADMISSION_POLICY_BINDINGS,
};
use super::store::{ObjectKey, Store, metadata_mut};

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The CEL environment: the standard library plus the strings extension (`join`,
/// `lowerAscii`, `split`, ...), as Kubernetes provides it.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .expect("the strings extension declares no duplicate overloads");
    Arc::new(env)
});

// ---------------------------------------------------------------------------------------------
// Static types, for the type check at creation.

/// A CEL type as far as the checker knows it.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    Dyn,
    Null,
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    List(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    /// A message with exactly these fields.
    Struct(&'static str, Vec<(&'static str, Ty)>),
    /// A Kubernetes object: `apiVersion`, `kind` and `metadata` are known, the rest is `dyn`.
    Object,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Dyn => write!(f, "dyn"),
            Ty::Null => write!(f, "null_type"),
            Ty::Bool => write!(f, "bool"),
            Ty::Int => write!(f, "int"),
            Ty::Uint => write!(f, "uint"),
            Ty::Double => write!(f, "double"),
            Ty::String => write!(f, "string"),
            Ty::Bytes => write!(f, "bytes"),
            Ty::List(e) => write!(f, "list({e})"),
            Ty::Map(k, v) => write!(f, "map({k}, {v})"),
            Ty::Struct(name, _) => write!(f, "{name}"),
            Ty::Object => write!(f, "Object"),
        }
    }
}

fn strings_list() -> Ty {
    Ty::List(Box::new(Ty::String))
}

fn string_map(value: Ty) -> Ty {
    Ty::Map(Box::new(Ty::String), Box::new(value))
}

fn metadata_type() -> Ty {
    Ty::Struct(
        "ObjectMeta",
        vec![
            ("name", Ty::String),
            ("generateName", Ty::String),
            ("namespace", Ty::String),
            ("uid", Ty::String),
            ("resourceVersion", Ty::String),
            ("generation", Ty::Int),
            ("creationTimestamp", Ty::Dyn),
            ("deletionTimestamp", Ty::Dyn),
            ("deletionGracePeriodSeconds", Ty::Int),
            ("labels", string_map(Ty::String)),
            ("annotations", string_map(Ty::String)),
            ("ownerReferences", Ty::List(Box::new(Ty::Dyn))),
            ("finalizers", strings_list()),
            ("managedFields", Ty::List(Box::new(Ty::Dyn))),
        ],
    )
}

fn request_type() -> Ty {
    let gvk = || {
        Ty::Struct(
            "GroupVersionKind",
            vec![
                ("group", Ty::String),
                ("version", Ty::String),
                ("kind", Ty::String),
            ],
        )
    };
    let gvr = || {
        Ty::Struct(
            "GroupVersionResource",
            vec![
                ("group", Ty::String),
                ("version", Ty::String),
                ("resource", Ty::String),
            ],
        )
    };
    Ty::Struct(
        "AdmissionRequest",
        vec![
            ("kind", gvk()),
            ("resource", gvr()),
            ("subResource", Ty::String),
            ("requestKind", gvk()),
            ("requestResource", gvr()),
            ("requestSubResource", Ty::String),
            ("name", Ty::String),
            ("namespace", Ty::String),
            ("operation", Ty::String),
            (
                "userInfo",
                Ty::Struct(
                    "UserInfo",
                    vec![
                        ("username", Ty::String),
                        ("uid", Ty::String),
                        ("groups", strings_list()),
                        ("extra", string_map(strings_list())),
                    ],
                ),
            ),
            ("dryRun", Ty::Bool),
            ("options", Ty::Dyn),
        ],
    )
}

/// Whether a value of type `a` can be used where `b` is expected (either way, as the checker's
/// `(A, A)` overloads unify).
fn compatible(a: &Ty, b: &Ty) -> bool {
    match (a, b) {
        (Ty::Dyn, _) | (_, Ty::Dyn) => true,
        (Ty::List(x), Ty::List(y)) => compatible(x, y),
        (Ty::Map(k1, v1), Ty::Map(k2, v2)) => compatible(k1, k2) && compatible(v1, v2),
        (Ty::Object, Ty::Object) => true,
        (Ty::Null, Ty::Object) | (Ty::Object, Ty::Null) => true,
        (Ty::Null, Ty::Struct(..)) | (Ty::Struct(..), Ty::Null) => true,
        _ => a == b,
    }
}

fn is_numeric(t: &Ty) -> bool {
    matches!(t, Ty::Int | Ty::Uint | Ty::Double | Ty::Dyn)
}

fn unify(a: Ty, b: &Ty) -> Ty {
    if a == *b { a } else { Ty::Dyn }
}

/// A type error at an expression node.
#[derive(Debug)]
struct TypeError {
    id: u64,
    message: String,
}

struct Checker {
    /// Variables in scope, innermost last.
    scope: Vec<(String, Ty)>,
}

fn no_overload(id: u64, function: &str, args: &[Ty]) -> TypeError {
    let list: Vec<String> = args.iter().map(Ty::to_string).collect();
    TypeError {
        id,
        message: format!(
            "found no matching overload for '{function}' applied to '({})'",
            list.join(", ")
        ),
    }
}

fn no_member_overload(id: u64, function: &str, target: &Ty, args: &[Ty]) -> TypeError {
    let list: Vec<String> = args.iter().map(Ty::to_string).collect();
    TypeError {
        id,
        message: format!(
            "found no matching overload for '{function}' applied to '{target}.({})'",
            list.join(", ")
        ),
    }
}

impl Checker {
    fn lookup(&self, name: &str) -> Option<Ty> {
        self.scope
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
    }

    fn check(&mut self, e: &IdedExpr) -> Result<Ty, TypeError> {
        match &e.expr {
            Expr::Unspecified => Ok(Ty::Dyn),
            Expr::Literal(l) => Ok(match l {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
                LiteralValue::UInt(_) => Ty::Uint,
            }),
            Expr::Ident(name) => self.lookup(name).ok_or_else(|| TypeError {
                id: e.id,
                message: format!("undeclared reference to '{name}' (in container '')"),
            }),
            Expr::Select(s) => {
                let operand = self.check(&s.operand)?;
                let field = select_field(e.id, &operand, &s.field)?;
                Ok(if s.test { Ty::Bool } else { field })
            }
            Expr::List(l) => {
                let mut elem: Option<Ty> = None;
                for item in &l.elements {
                    let t = self.check(item)?;
                    elem = Some(match elem {
                        None => t,
                        Some(prev) => unify(prev, &t),
                    });
                }
                Ok(Ty::List(Box::new(elem.unwrap_or(Ty::Dyn))))
            }
            Expr::Map(m) => {
                let mut key: Option<Ty> = None;
                let mut value: Option<Ty> = None;
                for entry in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                        let k = self.check(&me.key)?;
                        let v = self.check(&me.value)?;
                        key = Some(key.map_or(k.clone(), |p| unify(p, &k)));
                        value = Some(value.map_or(v.clone(), |p| unify(p, &v)));
                    }
                }
                Ok(Ty::Map(
                    Box::new(key.unwrap_or(Ty::Dyn)),
                    Box::new(value.unwrap_or(Ty::Dyn)),
                ))
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    if let cel::common::ast::EntryExpr::StructField(f) = &entry.expr {
                        self.check(&f.value)?;
                    }
                }
                Ok(Ty::Dyn)
            }
            Expr::Comprehension(c) => {
                let range = self.check(&c.iter_range)?;
                let (first, second) = match &range {
                    Ty::List(elem) => (Ty::Int, (**elem).clone()),
                    Ty::Map(k, v) => ((**k).clone(), (**v).clone()),
                    _ => (Ty::Dyn, Ty::Dyn),
                };
                self.check(&c.accu_init)?;
                let depth = self.scope.len();
                match &c.iter_var2 {
                    // Two-variable comprehensions: index (or key) and value.
                    Some(v2) => {
                        self.scope.push((c.iter_var.clone(), first));
                        self.scope.push((v2.clone(), second));
                    }
                    None => {
                        let single = match &range {
                            Ty::List(elem) => (**elem).clone(),
                            Ty::Map(k, _) => (**k).clone(),
                            _ => Ty::Dyn,
                        };
                        self.scope.push((c.iter_var.clone(), single));
                    }
                }
                self.scope.push((c.accu_var.clone(), Ty::Dyn));
                let r = (|| {
                    self.check(&c.loop_cond)?;
                    self.check(&c.loop_step)?;
                    self.check(&c.result)
                })();
                self.scope.truncate(depth);
                r
            }
            Expr::Call(call) => {
                let target = match &call.target {
                    Some(t) => Some(self.check(t)?),
                    None => None,
                };
                let mut args = Vec::with_capacity(call.args.len());
                for a in &call.args {
                    args.push(self.check(a)?);
                }
                check_call(e.id, &call.func_name, target.as_ref(), &args)
            }
        }
    }
}

fn select_field(id: u64, operand: &Ty, field: &str) -> Result<Ty, TypeError> {
    match operand {
        Ty::Dyn => Ok(Ty::Dyn),
        Ty::Map(k, v) if compatible(k, &Ty::String) => Ok((**v).clone()),
        Ty::Object => Ok(match field {
            "metadata" => metadata_type(),
            "apiVersion" | "kind" => Ty::String,
            _ => Ty::Dyn,
        }),
        Ty::Struct(_, fields) => fields
            .iter()
            .find(|(n, _)| *n == field)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| TypeError {
                id,
                message: format!("undefined field '{field}'"),
            }),
        other => Err(TypeError {
            id,
            message: format!("type '{other}' does not support field selection"),
        }),
    }
}

fn check_call(id: u64, name: &str, target: Option<&Ty>, args: &[Ty]) -> Result<Ty, TypeError> {
    let all = || {
        let mut v: Vec<Ty> = target.into_iter().cloned().collect();
        v.extend(args.iter().cloned());
        v
    };
    let fail = || match target {
        Some(t) => no_member_overload(id, name, t, args),
        None => no_overload(id, name, args),
    };
    let is = |t: &Ty, want: &Ty| compatible(t, want);
    match (name, target, args) {
        ("_&&_" | "_||_", None, [a, b]) => {
            if is(a, &Ty::Bool) && is(b, &Ty::Bool) {
                Ok(Ty::Bool)
            } else {
                Err(fail())
            }
        }
        ("!_", None, [a]) | ("@not_strictly_false", None, [a]) => {
            if is(a, &Ty::Bool) {
                Ok(Ty::Bool)
            } else {
                Err(fail())
            }
        }
        ("-_", None, [a]) => {
            if is_numeric(a) {
                Ok(a.clone())
            } else {
                Err(fail())
            }
        }
        ("_==_" | "_!=_", None, [a, b]) => {
            if compatible(a, b) || (*a == Ty::Null && !is_scalar(b)) || (*b == Ty::Null && !is_scalar(a)) {
                Ok(Ty::Bool)
            } else {
                Err(fail())
            }
        }
        ("_<_" | "_<=_" | "_>_" | "_>=_", None, [a, b]) => {
            let ok = (is_numeric(a) && is_numeric(b))
                || (compatible(a, b) && matches!(a, Ty::String | Ty::Bytes | Ty::Bool | Ty::Dyn));
            if ok { Ok(Ty::Bool) } else { Err(fail()) }
        }
        ("_+_", None, [a, b]) => match (a, b) {
            (Ty::Dyn, o) | (o, Ty::Dyn) => Ok(if matches!(o, Ty::Dyn) { Ty::Dyn } else { o.clone() }),
            (Ty::List(x), Ty::List(y)) => Ok(Ty::List(Box::new(unify((**x).clone(), y)))),
            (x, y) if x == y && matches!(x, Ty::String | Ty::Bytes | Ty::Int | Ty::Uint | Ty::Double) => {
                Ok(x.clone())
            }
            _ => Err(fail()),
        },
        ("_-_" | "_*_" | "_/_" | "_%_", None, [a, b]) => {
            if is_numeric(a) && is_numeric(b) && compatible(a, b) {
                Ok(if *a == Ty::Dyn { b.clone() } else { a.clone() })
            } else {
                Err(fail())
            }
        }
        ("_[_]", None, [container, index]) => match container {
            Ty::Dyn => Ok(Ty::Dyn),
            Ty::List(elem) if matches!(index, Ty::Int | Ty::Uint | Ty::Dyn) => Ok((**elem).clone()),
            Ty::Map(k, v) if compatible(k, index) => Ok((**v).clone()),
            _ => Err(fail()),
        },
        ("@in", None, [item, container]) => match container {
            Ty::Dyn => Ok(Ty::Bool),
            Ty::List(elem) if compatible(item, elem) => Ok(Ty::Bool),
            Ty::Map(k, _) if compatible(item, k) => Ok(Ty::Bool),
            _ => Err(fail()),
        },
        ("_?_:_", None, [cond, a, b]) => {
            if !is(cond, &Ty::Bool) || !compatible(a, b) {
                return Err(fail());
            }
            Ok(if *a == Ty::Dyn || *a == Ty::Null {
                b.clone()
            } else {
                a.clone()
            })
        }
        ("size", None, [a]) | ("size", Some(a), []) => match a {
            Ty::Dyn | Ty::String | Ty::Bytes | Ty::List(_) | Ty::Map(..) => Ok(Ty::Int),
            _ => Err(fail()),
        },
        ("string", None, [a]) => {
            if is_scalar(a) || *a == Ty::Dyn {
                Ok(Ty::String)
            } else {
                Err(fail())
            }
        }
        ("int" | "uint" | "double" | "bool" | "bytes", None, [a]) => {
            if is_scalar(a) || *a == Ty::Dyn {
                Ok(match name {
                    "int" => Ty::Int,
                    "uint" => Ty::Uint,
                    "double" => Ty::Double,
                    "bool" => Ty::Bool,
                    _ => Ty::Bytes,
                })
            } else {
                Err(fail())
            }
        }
        ("join", Some(t), rest) => {
            let target_ok = matches!(t, Ty::Dyn) || matches!(t, Ty::List(e) if compatible(e, &Ty::String));
            let args_ok = rest.len() <= 1 && rest.iter().all(|a| compatible(a, &Ty::String));
            if target_ok && args_ok {
                Ok(Ty::String)
            } else {
                Err(fail())
            }
        }
        ("startsWith" | "endsWith" | "contains" | "matches", Some(t), [a]) => {
            if compatible(t, &Ty::String) && compatible(a, &Ty::String) {
                Ok(Ty::Bool)
            } else {
                Err(fail())
            }
        }
        ("lowerAscii" | "upperAscii" | "trim", Some(t), []) => {
            if compatible(t, &Ty::String) {
                Ok(Ty::String)
            } else {
                Err(fail())
            }
        }
        ("split", Some(t), [sep]) => {
            if compatible(t, &Ty::String) && compatible(sep, &Ty::String) {
                Ok(strings_list())
            } else {
                Err(fail())
            }
        }
        _ => {
            let _ = all();
            Ok(Ty::Dyn)
        }
    }
}

fn is_scalar(t: &Ty) -> bool {
    matches!(
        t,
        Ty::Bool | Ty::Int | Ty::Uint | Ty::Double | Ty::String | Ty::Bytes
    )
}

// ---------------------------------------------------------------------------------------------
// Compiling policies.

/// One compiled CEL expression and its source.
#[derive(Debug)]
struct Compiled {
    source: String,
    program: Program,
}

/// Go's `%q` of a string, as Kubernetes quotes an invalid value.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// cel-go's error report: `ERROR: <input>:L:C: message`, the line, and a caret under the column.
fn report(source: &str, line: usize, column: usize, message: &str) -> String {
    let text = source.lines().nth(line.saturating_sub(1)).unwrap_or_default();
    format!(
        "ERROR: <input>:{line}:{column}: {message}\n | {text}\n | {}^",
        ".".repeat(column.saturating_sub(1))
    )
}

/// The 1-based line and column of byte offset `offset` in `source`.
fn position(source: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut line_start = 0;
    for (i, c) in source.char_indices() {
        if i >= offset {
            break;
        }
        if c == '\n' {
            line += 1;
            line_start = i + 1;
        }
    }
    let column = source
        .get(line_start..offset.min(source.len()))
        .map_or(1, |s| s.chars().count() + 1);
    (line, column)
}

/// Which variables an expression may use, and of what type.
fn root_scope(with_variables: bool) -> Vec<(String, Ty)> {
    let mut scope = vec![
        ("object".to_string(), Ty::Object),
        ("oldObject".to_string(), Ty::Object),
        ("namespaceObject".to_string(), Ty::Object),
        ("request".to_string(), request_type()),
        ("params".to_string(), Ty::Dyn),
    ];
    if with_variables {
        scope.push(("variables".to_string(), Ty::Dyn));
    }
    scope
}

/// What an expression must evaluate to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    Bool,
    String,
    Any,
}

/// Compiles and type-checks one expression; the error is the `compilation failed: ...` text.
fn compile(source: &str, want: Want, with_variables: bool) -> Result<Compiled, String> {
    let program = ENV.compile(source).map_err(|e| {
        // cel-go prefixes the snippet lines with " | "; the parser here with "| ".
        format!("compilation failed: {}", e.to_string().replace("\n| ", "\n | "))
    })?;
    let mut checker = Checker {
        scope: root_scope(with_variables),
    };
    let ty = checker.check(program.expression()).map_err(|err| {
        let offset = program
            .source_info()
            .offset_for(err.id)
            .map_or(0, |(start, _)| start as usize);
        let (line, column) = position(source, offset);
        format!(
            "compilation failed: {}",
            report(source, line, column, &err.message)
        )
    })?;
    match want {
        Want::Bool if !compatible(&ty, &Ty::Bool) => {
            return Err("compilation failed: cel expression must evaluate to a bool".into());
        }
        Want::String if !compatible(&ty, &Ty::String) => {
            return Err(format!(
                "compilation failed: messageExpression must evaluate to a string, got {ty}"
            ));
        }
        _ => {}
    }
    Ok(Compiled {
        source: source.to_string(),
        program,
    })
}

#[derive(Debug)]
struct Validation {
    expression: Compiled,
    message: Option<String>,
    message_expression: Option<Compiled>,
    reason: Option<String>,
}

/// A policy, compiled.
#[derive(Debug)]
pub struct CompiledPolicy {
    name: String,
    /// `spec.matchConstraints`.
    constraints: Value,
    match_conditions: Vec<Compiled>,
    variables: Vec<(String, Compiled)>,
    validations: Vec<Validation>,
    fail_closed: bool,
}

fn field_error(field: String, value: &str, why: &str) -> FieldError {
    FieldError {
        field,
        message: format!("Invalid value: {}: {why}", go_quote(value)),
    }
}

fn required(field: &str, why: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: format!("Required value{why}"),
    }
}

/// Compiles a `ValidatingAdmissionPolicy`, or lists why it is invalid (for a 422).
pub fn compile_policy(policy: &Value) -> Result<CompiledPolicy, Vec<FieldError>> {
    let spec = &policy["spec"];
    let mut errors = Vec::new();
    if !spec["matchConstraints"].is_object() {
        errors.push(required("spec.matchConstraints", ""));
    }
    let validations = spec["validations"].as_array().cloned().unwrap_or_default();
    let audit = spec["auditAnnotations"].as_array().map_or(0, Vec::len);
    if validations.is_empty() && audit == 0 {
        errors.push(required(
            "spec.validations",
            ": validations or auditAnnotations must contain at least one item",
        ));
    }
    let mut variables = Vec::new();
    let with_variables = spec["variables"].is_array();
    for (i, v) in spec["variables"].as_array().into_iter().flatten().enumerate() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let source = v["expression"].as_str().unwrap_or_default();
        match compile(source, Want::Any, true) {
            Ok(c) => variables.push((name, c)),
            Err(why) => errors.push(field_error(
                format!("spec.variables[{i}].expression"),
                source,
                &why,
            )),
        }
    }
    let mut match_conditions = Vec::new();
    for (i, m) in spec["matchConditions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let source = m["expression"].as_str().unwrap_or_default();
        if source.is_empty() {
            errors.push(required(&format!("spec.matchConditions[{i}].expression"), ""));
            continue;
        }
        match compile(source, Want::Bool, with_variables) {
            Ok(c) => match_conditions.push(c),
            Err(why) => errors.push(field_error(
                format!("spec.matchConditions[{i}].expression"),
                source,
                &why,
            )),
        }
    }
    let mut compiled = Vec::new();
    for (i, v) in validations.iter().enumerate() {
        let source = v["expression"].as_str().unwrap_or_default();
        if source.is_empty() {
            errors.push(required(&format!("spec.validations[{i}].expression"), ""));
            continue;
        }
        let expression = match compile(source, Want::Bool, with_variables) {
            Ok(c) => Some(c),
            Err(why) => {
                errors.push(field_error(
                    format!("spec.validations[{i}].expression"),
                    source,
                    &why,
                ));
                None
            }
        };
        let message_expression = match v["messageExpression"].as_str() {
            Some(m) => match compile(m, Want::String, with_variables) {
                Ok(c) => Some(c),
                Err(why) => {
                    errors.push(field_error(
                        format!("spec.validations[{i}].messageExpression"),
                        m,
                        &why,
                    ));
                    None
                }
            },
            None => None,
        };
        if let Some(expression) = expression {
            compiled.push(Validation {
                expression,
                message: v["message"].as_str().map(str::to_string),
                message_expression,
                reason: v["reason"].as_str().map(str::to_string),
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledPolicy {
        name: policy["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        constraints: spec["matchConstraints"].clone(),
        match_conditions,
        variables,
        validations: compiled,
        fail_closed: spec["failurePolicy"].as_str() != Some("Ignore"),
    })
}

/// Validates a binding (for a 422).
pub fn validate_binding(binding: &Value) -> Vec<FieldError> {
    let spec = &binding["spec"];
    let mut errors = Vec::new();
    if spec["policyName"].as_str().unwrap_or_default().is_empty() {
        errors.push(required("spec.policyName", ""));
    }
    let actions = spec["validationActions"].as_array().cloned().unwrap_or_default();
    if actions.is_empty() {
        errors.push(required("spec.validationActions", ""));
    }
    for (i, a) in actions.iter().enumerate() {
        let a = a.as_str().unwrap_or_default();
        if !matches!(a, "Deny" | "Warn" | "Audit") {
            errors.push(FieldError {
                field: format!("spec.validationActions[{i}]"),
                message: format!(
                    "Unsupported value: {}: supported values: \"Audit\", \"Deny\", \"Warn\"",
                    go_quote(a)
                ),
            });
        }
    }
    errors
}

/// What the real server fills in on a stored policy or binding: the defaulted match fields,
/// `generation`, and a policy's empty `status`.
pub fn apply_defaults(resource: &Resource, object: &mut Value, generation: i64) {
    metadata_mut(object).insert("generation".into(), json!(generation));
    let Some(spec) = object.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    let match_field = if std::ptr::eq(resource, &VALIDATING_ADMISSION_POLICIES) {
        if spec.get("failurePolicy").is_none() {
            spec["failurePolicy"] = json!("Fail");
        }
        "matchConstraints"
    } else {
        "matchResources"
    };
    if let Some(m) = spec.get_mut(match_field).filter(|m| m.is_object()) {
        for (k, v) in [
            ("matchPolicy", json!("Equivalent")),
            ("namespaceSelector", json!({})),
            ("objectSelector", json!({})),
        ] {
            if m.get(k).is_none() {
                m[k] = v;
            }
        }
        for list in ["resourceRules", "excludeResourceRules"] {
            for rule in m
                .get_mut(list)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if rule.get("scope").is_none() {
                    rule["scope"] = json!("*");
                }
            }
        }
    }
    if std::ptr::eq(resource, &VALIDATING_ADMISSION_POLICIES) && object.get("status").is_none() {
        object["status"] = json!({});
    }
}

// ---------------------------------------------------------------------------------------------
// Matching.

fn list_has(list: &Value, want: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|x| x == "*" || x == want))
}

/// Whether a `resourceRules` entry selects the request.
fn rule_matches(rule: &Value, resource: &Resource, operation: &str) -> bool {
    let scope_ok = match rule["scope"].as_str().unwrap_or("*") {
        "Namespaced" => resource.namespaced,
        "Cluster" => !resource.namespaced,
        _ => true,
    };
    scope_ok
        && list_has(&rule["apiGroups"], resource.group)
        && list_has(&rule["apiVersions"], resource.version)
        && list_has(&rule["resources"], resource.plural)
        && list_has(&rule["operations"], operation)
}

/// A `metav1.LabelSelector` (`matchLabels`, `matchExpressions`); an empty or absent selector
/// selects everything.
pub fn label_selector_matches(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let labels_ok = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let expressions_ok = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str().unwrap_or_default() {
                "In" => label(key).is_some_and(|l| values.contains(&l)),
                "NotIn" => label(key).is_none_or(|l| !values.contains(&l)),
                "Exists" => label(key).is_some(),
                "DoesNotExist" => label(key).is_none(),
                _ => false,
            }
        });
    labels_ok && expressions_ok
}

/// Whether `matchConstraints` / `matchResources` select a request.
fn match_resources(m: &Value, resource: &Resource, operation: &str, namespace: &Value) -> bool {
    if !m.is_object() {
        return true;
    }
    if let Some(rules) = m["resourceRules"].as_array()
        && !rules.iter().any(|r| rule_matches(r, resource, operation))
    {
        return false;
    }
    if m["excludeResourceRules"]
        .as_array()
        .is_some_and(|rules| rules.iter().any(|r| rule_matches(r, resource, operation)))
    {
        return false;
    }
    !resource.namespaced || label_selector_matches(&m["namespaceSelector"], &namespace["metadata"]["labels"])
}

// ---------------------------------------------------------------------------------------------
// Admission.

/// The groups a user of the test server is in, as a real authenticator reports them.
pub fn groups_of(user: &User) -> Vec<String> {
    if user.name == "system:anonymous" {
        return vec!["system:unauthenticated".into()];
    }
    let mut groups = Vec::new();
    if user.name == "admin" {
        groups.push("system:masters".to_string());
    }
    if let Some(rest) = user.name.strip_prefix("system:serviceaccount:")
        && let Some((namespace, _)) = rest.split_once(':')
    {
        groups.push("system:serviceaccounts".into());
        groups.push(format!("system:serviceaccounts:{namespace}"));
    }
    groups.push("system:authenticated".into());
    groups
}

/// The namespace object as admission sees it: the stored one, or one that carries only its
/// name label when it was never created.
pub fn namespace_object(store: &Store, namespace: &str) -> Value {
    let key = ObjectKey {
        resource: NAMESPACES.plural,
        namespace: String::new(),
        name: namespace.to_string(),
    };
    store.get(&key).unwrap_or_else(|| {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {NAMESPACE_NAME_LABEL: namespace}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        })
    })
}

/// Compiled policies, kept while their resourceVersion stays the same.
#[derive(Debug, Default)]
pub(crate) struct PolicyCache {
    compiled: Mutex<HashMap<String, (String, Arc<CompiledPolicy>)>>,
}

impl PolicyCache {
    fn get(&self, policy: &Value) -> Option<Arc<CompiledPolicy>> {
        let name = policy["metadata"]["name"].as_str()?.to_string();
        let rv = policy["metadata"]["resourceVersion"].as_str()?.to_string();
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached_rv, c)) = cache.get(&name)
            && *cached_rv == rv
        {
            return Some(c.clone());
        }
        // Stored policies compiled when they were written; this cannot fail.
        let compiled = Arc::new(compile_policy(policy).ok()?);
        cache.insert(name, (rv, compiled.clone()));
        Some(compiled)
    }
}

/// The policies and bindings that apply in one namespace, gathered before a write takes the
/// store's lock (so that a patch can be reviewed inside it).
#[derive(Debug)]
pub(crate) struct Admission {
    /// Each binding with its policy, in binding-name order.
    bound: Vec<(Arc<CompiledPolicy>, Value)>,
    namespace_object: Value,
}

/// One request to review.
#[derive(Debug)]
pub(crate) struct Review<'a> {
    pub resource: &'static Resource,
    pub operation: &'static str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub user: &'a User,
    pub object: Option<&'a Value>,
    pub old_object: Option<&'a Value>,
}

impl Admission {
    pub(crate) fn prepare(store: &Store, cache: &PolicyCache, namespace: &str) -> Self {
        let (policies, _) = store.list(&VALIDATING_ADMISSION_POLICIES, None);
        let (bindings, _) = store.list(&VALIDATING_ADMISSION_POLICY_BINDINGS, None);
        let by_name: BTreeMap<&str, &Value> = policies
            .iter()
            .filter_map(|p| Some((p["metadata"]["name"].as_str()?, p)))
            .collect();
        let bound = bindings
            .iter()
            .filter_map(|b| {
                let policy = by_name.get(b["spec"]["policyName"].as_str()?)?;
                Some((cache.get(policy)?, b.clone()))
            })
            .collect();
        Admission {
            bound,
            namespace_object: namespace_object(store, namespace),
        }
    }

    /// `Ok` when every applicable binding admits the request; else the `Status` to answer with.
    pub(crate) fn review(&self, r: &Review<'_>) -> Result<(), Value> {
        if self.bound.is_empty() {
            return Ok(());
        }
        let request = json!({
            "kind": {"group": r.resource.group, "version": r.resource.version, "kind": r.resource.kind},
            "resource": {"group": r.resource.group, "version": r.resource.version, "resource": r.resource.plural},
            "subResource": "",
            "requestKind": {"group": r.resource.group, "version": r.resource.version, "kind": r.resource.kind},
            "requestResource": {"group": r.resource.group, "version": r.resource.version, "resource": r.resource.plural},
            "requestSubResource": "",
            "name": r.name,
            "namespace": r.namespace,
            "operation": r.operation,
            "userInfo": {
                "username": r.user.name,
                "uid": "",
                "groups": groups_of(r.user),
                "extra": r.user.extra,
            },
            "dryRun": false,
            "options": {},
        });
        let namespace_object = if r.resource.namespaced {
            self.namespace_object.clone()
        } else {
            Value::Null
        };
        for (policy, binding) in &self.bound {
            if !match_resources(&policy.constraints, r.resource, r.operation, &namespace_object)
                || !match_resources(
                    &binding["spec"]["matchResources"],
                    r.resource,
                    r.operation,
                    &namespace_object,
                )
            {
                continue;
            }
            let mut ctx = Context::with_env(ENV.clone());
            let vars = [
                ("object", r.object.cloned().unwrap_or(Value::Null)),
                ("oldObject", r.old_object.cloned().unwrap_or(Value::Null)),
                ("request", request.clone()),
                ("namespaceObject", namespace_object.clone()),
                ("params", Value::Null),
            ];
            for (name, value) in vars {
                if ctx.add_variable(name, value).is_err() {
                    return Err(internal_error(policy, binding, "a variable could not be bound"));
                }
            }
            let binding_name = binding["metadata"]["name"].as_str().unwrap_or_default();
            let deny = binding["spec"]["validationActions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "Deny"));
            let decision = evaluate(policy, &mut ctx);
            if let Some((reason, message)) = decision
                && deny
            {
                let message = format!(
                    "ValidatingAdmissionPolicy '{}' with binding '{binding_name}' denied request: {message}",
                    policy.name
                );
                return Err(resources::admission_denied(
                    r.resource,
                    r.name,
                    reason.as_deref(),
                    &message,
                ));
            }
        }
        Ok(())
    }
}

fn internal_error(policy: &CompiledPolicy, binding: &Value, why: &str) -> Value {
    resources::status(
        500,
        "InternalError",
        format!(
            "Internal error occurred: ValidatingAdmissionPolicy '{}' with binding '{}': {why}",
            policy.name,
            binding["metadata"]["name"].as_str().unwrap_or_default()
        ),
        None,
    )
}

/// Evaluates one policy: `None` when it admits (or does not apply), else the refusal's reason
/// (if the validation names one) and message.
fn evaluate(policy: &CompiledPolicy, ctx: &mut Context<'_, '_>) -> Option<(Option<String>, String)> {
    let error = |source: &str, e: String| {
        policy
            .fail_closed
            .then(|| (None, format!("expression '{source}' resulted in error: {e}")))
    };
    if !policy.variables.is_empty() {
        let mut values: HashMap<String, cel::Value> = HashMap::new();
        for (name, c) in &policy.variables {
            let result = {
                let mut inner = ctx.new_inner_scope();
                inner.add_variable_from_value("variables", values.clone());
                c.program.execute(&inner)
            };
            match result {
                Ok(v) => {
                    values.insert(name.clone(), v);
                }
                Err(e) => return error(&c.source, e.to_string()),
            }
        }
        ctx.add_variable_from_value("variables", values);
    }
    for condition in &policy.match_conditions {
        match condition.program.execute(ctx) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => return None,
            Ok(other) => return error(&condition.source, format!("not a bool: {other:?}")),
            Err(e) => return error(&condition.source, e.to_string()),
        }
    }
    for v in &policy.validations {
        match v.expression.program.execute(ctx) {
            Ok(cel::Value::Bool(true)) => continue,
            Ok(cel::Value::Bool(false)) => {}
            Ok(other) => return error(&v.expression.source, format!("not a bool: {other:?}")),
            Err(e) => return error(&v.expression.source, e.to_string()),
        }
        let from_expression = v
            .message_expression
            .as_ref()
            .and_then(|m| match m.program.execute(ctx) {
                Ok(cel::Value::String(s)) if !s.trim().is_empty() && !s.contains('\n') => Some(s.to_string()),
                _ => None,
            });
        let message = from_expression
            .or_else(|| v.message.clone().filter(|m| !m.is_empty()))
            .unwrap_or_else(|| format!("failed expression: {}", v.expression.source));
        return Some((v.reason.clone(), message));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(source: &str) -> String {
        compile(source, Want::Bool, false).err().unwrap_or_default()
    }

    #[test]
    fn type_errors_are_reported_like_cel_go() {
        let src = "'node ' + string(request.userInfo.extra['k']) == 'x'";
        let e = error_of(src);
        assert!(
            e.contains(
                "ERROR: <input>:1:17: found no matching overload for 'string' applied to '(list(string))'"
            ),
            "{e}"
        );
        assert!(e.ends_with(&format!(" | {src}\n | {}^", ".".repeat(16))), "{e}");
        assert!(
            error_of("object.metadata.annotations['a'] == request.userInfo.extra['b']")
                .contains("'_==_' applied to '(string, list(string))'")
        );
        assert!(error_of("request.userInfo.nope == 'x'").contains("undefined field 'nope'"));
        assert!(error_of("nothing == 1").contains("undeclared reference to 'nothing'"));
        assert!(error_of("request.operation").contains("must evaluate to a bool"));
        assert!(error_of("a +").contains("Syntax error"));
        for ok in [
            "!has(object.subsets) || size(object.subsets) == 0",
            "request.userInfo.extra['k'].join(',') != '' && 'a' in object.metadata.labels",
            "object.subsets.all(s, size(s.addresses) == 0)",
            "namespaceObject.metadata.name in ['a', 'b'] ? true : false",
            "request.operation != 'DELETE' || oldObject == null",
        ] {
            assert!(
                compile(ok, Want::Bool, false).is_ok(),
                "{ok}: {:?}",
                compile(ok, Want::Bool, false).err()
            );
        }
    }

    #[test]
    fn malformed_objects_are_refused_not_panicked_on() {
        for bad in [
            json!({"metadata": "x", "spec": "y"}),
            json!({"spec": {"validations": "no", "matchConstraints": []}}),
            json!({"spec": {"validations": [{"expression": 7}], "matchConditions": [{}]}}),
            json!(null),
        ] {
            assert!(compile_policy(&bad).is_err(), "{bad}");
            assert!(!validate_binding(&bad).is_empty(), "{bad}");
            let mut object = bad.clone();
            apply_defaults(&VALIDATING_ADMISSION_POLICIES, &mut object, 1);
            apply_defaults(&VALIDATING_ADMISSION_POLICY_BINDINGS, &mut object, 1);
        }
    }

    #[test]
    fn selectors() {
        let labels = json!({"a": "1", "b": "2"});
        assert!(label_selector_matches(&json!({}), &labels));
        assert!(label_selector_matches(
            &json!({"matchLabels": {"a": "1"}}),
            &labels
        ));
        assert!(!label_selector_matches(
            &json!({"matchLabels": {"a": "2"}}),
            &labels
        ));
        assert!(label_selector_matches(
            &json!({"matchExpressions": [{"key": "c", "operator": "DoesNotExist"}, {"key": "b", "operator": "NotIn", "values": ["3"]}]}),
            &labels
        ));
        assert!(!label_selector_matches(
            &json!({"matchExpressions": [{"key": "b", "operator": "In", "values": ["3"]}]}),
            &labels
        ));
    }
}
