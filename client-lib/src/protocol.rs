//! Protocol v1: the newline-delimited JSON spoken on the broker's Unix socket.
//!
//! This module is the single definition of the wire format, shared by `electord` (the broker) and
//! this client library. `PROTOCOL.md` at the repository root documents it for other languages.
//!
//! Every message is one JSON object on one line (`\n`-terminated, at most [`MAX_LINE_BYTES`]).
//! The client sends [`Request`]s (tagged by `"op"`); the broker sends [`Event`]s (tagged by
//! `"event"`), starting with a [`Hello`] greeting as soon as the connection is accepted.
//!
//! ```
//! use elector_client::protocol::{parse_request, Request};
//! let req = parse_request(br#"{"op":"campaign","id":1,"election":"web","identity":"pod-a"}"#).unwrap();
//! match req {
//!     Request::Campaign(c) => assert_eq!(c.election, "web"),
//!     _ => unreachable!(),
//! }
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The protocol version the broker announces in its greeting.
pub const PROTOCOL_VERSION: u32 = 1;

/// The protocol's minor version (greeting field `protocol_minor`): 1 adds leaders' guarantees
/// (`valid_until`, `renewed`), `jeopardy`, `resume` and `safe`. Every addition is a new field
/// or event that a 1.0 client ignores.
pub const PROTOCOL_MINOR: u32 = 1;

/// The longest line (request or event) either side accepts, in bytes, without the newline.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The default socket path of the broker (a hostPath directory mounted into pods).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/elector/elector.sock";

/// Which Kubernetes object holds an election's lock record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// A `coordination.k8s.io/v1` Lease (client-go's `LeaseLock`). The default.
    #[default]
    Lease,
    /// A core/v1 Endpoints object with the `control-plane.alpha.kubernetes.io/leader`
    /// annotation: the 2016 leader-elector sidecar's and client-go's `EndpointsLock` format.
    Endpoints,
}

impl LockKind {
    /// The name used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        wire_name(&self)
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-election timing, in seconds. Every field is optional on the wire; the broker fills in its
/// defaults (15 s / 10 s / 2 s unless configured otherwise) and enforces
/// `lease_duration > renew_deadline > 1.2 × retry_period`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// How long a holder's record stays valid after it was last seen to change. Whole seconds:
    /// the lock record stores `leaseDurationSeconds` as an integer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration: Option<u64>,
    /// A leader that has not renewed successfully for this long is told `lost` and stops claiming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_deadline: Option<f64>,
    /// How often the leader renews, and how often a failed request is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_period: Option<f64>,
}

/// A request id, echoed in the reply: any JSON string or number.
pub type RequestId = Value;

/// Names an election: its namespace (broker default when omitted) and name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectionRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    pub election: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Only meaningful for `observe`: which lock object to watch (default `lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockKind>,
}

/// `{"op":"campaign", ...}`: become a candidate in an election.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    /// The election's name: the name of the lock object (a DNS-1123 subdomain).
    pub election: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The holder identity written into the lock record (usually the pod name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    /// Among this node's candidates of one election, a higher priority is chosen first at the
    /// next handover (ties: first come). Never preempts a live leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// `resume` only: the term this candidate led in through a broker that went away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// `resume` only: the candidate's guarantee (`CLOCK_MONOTONIC` ns) it acts on until
    /// confirmed; a confirmation that would come later is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<u64>,
}

/// `{"op":"status"}` and `{"op":"ping"}` take only an id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BareRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
}

/// A request from an application to the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Campaign(CampaignRequest),
    /// A campaign that first claims to go on leading in `term` (protocol 1.1).
    Resume(CampaignRequest),
    Resign(ElectionRef),
    Observe(ElectionRef),
    Unobserve(ElectionRef),
    Status(BareRequest),
    Ping(BareRequest),
}

impl Request {
    /// The request's `op`.
    pub fn op(&self) -> Op {
        match self {
            Request::Campaign(_) => Op::Campaign,
            Request::Resume(_) => Op::Resume,
            Request::Resign(_) => Op::Resign,
            Request::Observe(_) => Op::Observe,
            Request::Unobserve(_) => Op::Unobserve,
            Request::Status(_) => Op::Status,
            Request::Ping(_) => Op::Ping,
        }
    }

    /// The request's id, if the client gave one.
    pub fn id(&self) -> Option<&RequestId> {
        match self {
            Request::Campaign(r) | Request::Resume(r) => r.id.as_ref(),
            Request::Resign(r) | Request::Observe(r) | Request::Unobserve(r) => r.id.as_ref(),
            Request::Status(r) | Request::Ping(r) => r.id.as_ref(),
        }
    }
}

/// A request's `op`, named as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Campaign,
    Resume,
    Resign,
    Observe,
    Unobserve,
    Status,
    Ping,
}

impl Op {
    /// Every `op` the broker knows.
    pub const ALL: [Op; 7] = [
        Op::Campaign,
        Op::Resume,
        Op::Resign,
        Op::Observe,
        Op::Unobserve,
        Op::Status,
        Op::Ping,
    ];

    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        wire_name(&self)
    }

    /// The op named `name` on the wire.
    pub fn from_wire(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == name)
    }

    /// `campaign, resume, ...`, for messages.
    fn known() -> String {
        Op::ALL.map(Op::as_str).join(", ")
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name serde gives a unit variant on the wire (its `rename_all`), so that no table of
/// names can drift from the wire format.
fn wire_name<T: Serialize>(variant: &T) -> &'static str {
    // Every enum passed here has only unit variants, which always have a name.
    serde_variant::to_variant_name(variant).unwrap_or("unknown")
}

/// Why a candidate stopped leading (or never will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// The candidate resigned (the `resign` op).
    Resigned,
    /// No renewal succeeded within the renew deadline (API unreachable, errors, partition).
    RenewFailed,
    /// Someone else wrote the lock record (another elector, client-go or a human).
    Preempted,
    /// The broker is shutting down and released the lock.
    BrokerShutdown,
    /// Client side only: the broker went away while this candidate led, and no broker confirmed
    /// the leadership before its guarantee (`valid_until`) ran out.
    BrokerUnavailable,
    /// Client side only: the connection to the broker broke.
    Disconnected,
}

impl LostReason {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        wire_name(&self)
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stable, machine-readable error code. The human message may change; codes do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is longer than [`MAX_LINE_BYTES`]; it was discarded.
    LineTooLong,
    InvalidUtf8,
    InvalidJson,
    /// A missing or mistyped field, an unknown field, or a line that is not a JSON object.
    InvalidRequest,
    UnknownOp,
    InvalidElection,
    InvalidNamespace,
    InvalidIdentity,
    InvalidTiming,
    AlreadyCampaigning,
    NotCampaigning,
    NotObserving,
    /// Another local candidate of this election already uses this identity.
    IdentityInUse,
    TooManyCampaigns,
    TooManyConnections,
    ForbiddenNamespace,
    ForbiddenIdentity,
    /// The caller could not be attested (pod unknown, process exited, ...).
    Unattested,
    /// Nothing was asked within the first-request deadline, or the connection sat idle.
    Timeout,
    /// Too many bad requests in a row: the connection is closed.
    TooManyErrors,
    /// The client did not read its events: the connection is closed.
    SlowConsumer,
    /// The Kubernetes API refused the broker (403) for this election's lock: RBAC or the
    /// admission policy (typically: the namespace is not enabled for elector). Sent once, not
    /// tied to a request; the message names the missing permission. The campaign stays, and
    /// the broker tries again every 30 s.
    ApiForbidden,
    /// The election's Endpoints object serves a live Service (it has subsets): the broker never
    /// writes it. Pick another name, or a Lease lock. Sent once, like `api_forbidden`.
    NotALock,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    /// The code as on the wire (also the `reason` label of the rejection metrics).
    pub fn as_str(self) -> &'static str {
        wire_name(&self)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who the broker believes the caller is (filled in when the broker attests callers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Caller {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// The first line the broker sends on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub broker_version: String,
    pub node: String,
    /// The namespace used when a request names none.
    pub default_namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
    /// Protocol 1.1: the minor version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_minor: Option<u32>,
    /// Protocol 1.1: the broker's `CLOCK_MONOTONIC` when it greeted, in nanoseconds, so a client
    /// can check it shares the clock that `valid_until` is stated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monotonic_now: Option<u64>,
}

/// Identifies the election an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ElectionName {
    pub election: String,
    pub namespace: String,
    pub lock: LockKind,
}

impl fmt::Display for ElectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.lock, self.namespace, self.election)
    }
}

/// `{"event":"leader", ...}`: who leads an election now, sent to every local candidate and
/// observer whenever it changes (and once right after `campaign` / `observe`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderEvent {
    #[serde(flatten)]
    pub name: ElectionName,
    /// The current holder, or `null` when nobody holds a live lease.
    pub leader: Option<String>,
    /// `leaderTransitions` of the lock record: grows with every change of holder (a fencing token).
    pub term: Option<u64>,
    /// True only on the connection whose candidate is the leader.
    pub is_me: bool,
    /// Present when the broker cannot tell who leads (it cannot read the lock): why. `leader`
    /// is then `null` and means "unknown", not "nobody"; `term` is the highest term seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// `{"event":"elected", ...}`: this connection's candidate now leads, in `term`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElectedEvent {
    #[serde(flatten)]
    pub name: ElectionName,
    pub identity: String,
    pub term: u64,
    /// Protocol 1.1: until when (`CLOCK_MONOTONIC` ns) the leader may act without hearing more;
    /// always before any other node can take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<u64>,
}

/// `renewed`, `safe` and `jeopardy` (protocol 1.1): the leader's guarantee, `valid_until`
/// (`CLOCK_MONOTONIC` ns), after a renewal, after a resumed leadership was confirmed, and when
/// the broker goes away without releasing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuaranteeEvent {
    #[serde(flatten)]
    pub name: ElectionName,
    pub identity: String,
    pub term: u64,
    pub valid_until: u64,
}

/// `{"event":"lost", ...}`: this connection's candidate no longer leads (sent before anyone else
/// can take over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LostEvent {
    #[serde(flatten)]
    pub name: ElectionName,
    pub identity: String,
    pub term: u64,
    pub reason: LostReason,
}

/// `{"event":"ok", ...}`: a request succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OkReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none", flatten)]
    pub name: Option<ElectionName>,
    /// For `campaign`: the identity the broker campaigns under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// `{"event":"error", ...}`: a request failed, or the connection is about to be closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

/// One election of this connection in a `status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElectionStatus {
    #[serde(flatten)]
    pub name: ElectionName,
    /// For campaigns: this connection's identity; absent for observations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub leader: Option<String>,
    pub term: Option<u64>,
    pub is_me: bool,
    /// As on `leader` events: why the broker cannot tell who leads, when it cannot (the lock
    /// cannot be read: the API is unreachable, refuses, or has not answered yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// `{"event":"status", ...}`: reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    pub campaigns: Vec<ElectionStatus>,
    pub observations: Vec<ElectionStatus>,
}

/// `{"event":"pong"}`: reply to `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Pong {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
}

/// `{"event":"reconnect","reason":"superseded"}` (1.1): a successor broker serves this socket
/// path now (a rolling upgrade). The broker closes the connection right after this event, having
/// told each of its leaders `jeopardy`: connect again at once (no back-off), resume, campaign and
/// observe there. A 1.0 client, which ignores the event, sees the connection close.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconnectEvent {
    pub reason: String,
}

/// A message from the broker to an application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Hello(Hello),
    Leader(LeaderEvent),
    Elected(ElectedEvent),
    Renewed(GuaranteeEvent),
    Safe(GuaranteeEvent),
    Jeopardy(GuaranteeEvent),
    Lost(LostEvent),
    Ok(OkReply),
    Error(ErrorEvent),
    Status(StatusReply),
    Pong(Pong),
    Reconnect(ReconnectEvent),
}

impl Event {
    /// One JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no
        // user-defined Serialize impls that error.
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"event":"error","code":"internal","message":"event serialization failed"}"#.to_vec()
        });
        v.push(b'\n');
        v
    }
}

/// Why a request line was rejected, with what the broker replies.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    pub fn new(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            id,
            code,
            message: message.into(),
        }
    }

    pub fn into_event(self) -> Event {
        Event::Error(ErrorEvent {
            id: self.id,
            code: self.code,
            message: self.message,
        })
    }
}

/// Parses one request line (without its newline). The error carries the request's `id` when
/// it could be read, so that even a rejected request can be matched to its reply.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(line).map_err(|e| {
        RequestError::new(
            None,
            ErrorCode::InvalidUtf8,
            format!(
                "the line is not valid UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })?;
    let value = match serde_json::from_str::<UniqueKeys>(text) {
        Ok(UniqueKeys(value)) => value,
        // Only a duplicate key is a data error here: the JSON itself is well formed.
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Err(RequestError::new(None, ErrorCode::InvalidRequest, e.to_string()));
        }
        Err(e) => {
            return Err(RequestError::new(
                None,
                ErrorCode::InvalidJson,
                format!("invalid JSON: {e}"),
            ));
        }
    };
    let Value::Object(obj) = &value else {
        return Err(RequestError::new(
            None,
            ErrorCode::InvalidRequest,
            "a request must be a JSON object, like {\"op\":\"ping\"}",
        ));
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v.clone()),
        Some(Value::Number(n)) if exact_id(n) => Some(Value::Number(n.clone())),
        Some(Value::Number(n)) => {
            return Err(RequestError::new(
                None,
                ErrorCode::InvalidRequest,
                format!(
                    "field `id` {n} cannot be echoed exactly: a numeric id must be an integer of at most 2^53 - 1 in magnitude; send other ids as strings"
                ),
            ));
        }
        Some(_) => {
            return Err(RequestError::new(
                None,
                ErrorCode::InvalidRequest,
                "field `id` must be a string or a number",
            ));
        }
    };
    match obj.get("op") {
        None => {
            return Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                format!("missing field `op` (one of: {})", Op::known()),
            ));
        }
        Some(Value::String(op)) if Op::from_wire(op).is_none() => {
            let shown: String = op.chars().take(64).collect();
            return Err(RequestError::new(
                id,
                ErrorCode::UnknownOp,
                format!("unknown op {shown:?} (known: {})", Op::known()),
            ));
        }
        Some(Value::String(_)) => {}
        Some(_) => {
            return Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "field `op` must be a string",
            ));
        }
    }
    serde_json::from_value::<Request>(value)
        .map_err(|e| RequestError::new(id, ErrorCode::InvalidRequest, format!("bad request: {e}")))
}

/// The largest integer every JSON implementation holds exactly (2^53 - 1).
const MAX_EXACT_ID: u64 = (1 << 53) - 1;

/// Whether a numeric id comes back exactly as sent: an integer within +-(2^53 - 1). Larger
/// ones and fractions would come back rounded (or in another notation).
fn exact_id(n: &serde_json::Number) -> bool {
    n.as_u64().is_some_and(|v| v <= MAX_EXACT_ID)
        || n.as_i64().is_some_and(|v| v.unsigned_abs() <= MAX_EXACT_ID)
}

/// A JSON value in which no object repeats a key (`{"op":"ping","op":"campaign"}` is
/// refused: with the last key winning, what runs would not be what a reader of the line sees).
struct UniqueKeys(Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {shown:?}: each key may appear once per object"
                )));
            }
            let UniqueKeys(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(Value::Object(object))
    }
}

/// Parses one event line from the broker.
pub fn parse_event(line: &[u8]) -> Result<Event, serde_json::Error> {
    serde_json::from_slice(line)
}

/// Checks a name against Kubernetes' DNS-1123 subdomain rule (what an object name must be):
/// at most 253 characters of lowercase alphanumerics, `-` and `.`, each dot-separated label
/// starting and ending with an alphanumeric.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b.iter().all(|c| !c.is_ascii_uppercase())
    })
}

/// Checks a namespace name (a DNS-1123 label: at most 63 characters, no dots).
pub fn is_dns1123_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns1123_subdomain(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        for (line, op) in [
            (r#"{"op":"campaign","election":"a","identity":"p"}"#, Op::Campaign),
            (r#"{"op":"resume","election":"a","term":3}"#, Op::Resume),
            (r#"{"op":"resign","election":"a"}"#, Op::Resign),
            (
                r#"{"op":"observe","election":"a","lock":"endpoints"}"#,
                Op::Observe,
            ),
            (r#"{"op":"unobserve","election":"a"}"#, Op::Unobserve),
            (r#"{"op":"status"}"#, Op::Status),
            (r#"{"op":"ping","id":"x"}"#, Op::Ping),
        ] {
            let request = parse_request(line.as_bytes()).unwrap();
            assert_eq!(request.op(), op);
            let tag = serde_json::to_value(&request).unwrap()["op"].clone();
            assert_eq!(
                tag,
                Value::from(op.as_str()),
                "Op names agree with Request's tags"
            );
            assert_eq!(Op::from_wire(op.as_str()), Some(op));
        }
    }

    #[test]
    fn errors_have_codes_and_keep_the_id() {
        let e = parse_request(b"\xff\xfe").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidUtf8);
        let e = parse_request(b"{nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = parse_request(br#"[1,2]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = parse_request(br#"{"op":"dance","id":7}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownOp, Some(Value::from(7))));
        let e = parse_request(br#"{"op":"campaign","id":"q"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("election"), "{}", e.message);
        assert_eq!(e.id, Some(Value::from("q")));
        let e = parse_request(br#"{"op":"campaign","election":5,"identity":"p"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        let e = parse_request(br#"{"op":"ping","op":"campaign","election":"e","identity":"p"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("duplicate key \"op\""), "{}", e.message);
        let e = parse_request(br#"{"op":"campaign","election":"e","identity":"p","timing":{"retry_period":1,"retry_period":2}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        for big in [
            "18446744073709551616",
            "9007199254740992",
            "-9007199254740992",
            "1.5",
            "1e3",
        ] {
            let e = parse_request(format!(r#"{{"op":"ping","id":{big}}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{big}");
        }
        for exact in ["9007199254740991", "-9007199254740991", "0"] {
            let r = parse_request(format!(r#"{{"op":"ping","id":{exact}}}"#).as_bytes()).unwrap();
            assert_eq!(r.id().unwrap().to_string(), exact);
        }
        let e = parse_request(br#"{"op":"ping","bogus":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("bogus"));
    }

    #[test]
    fn events_round_trip_with_flat_fields() {
        let ev = Event::Leader(LeaderEvent {
            name: ElectionName {
                election: "web".into(),
                namespace: "default".into(),
                lock: LockKind::Lease,
            },
            leader: Some("pod-a".into()),
            term: Some(3),
            is_me: false,
            unknown: None,
        });
        let line = ev.to_line();
        assert!(
            !std::str::from_utf8(&line).unwrap().contains("unknown"),
            "absent unless unknown"
        );
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.ends_with('\n'));
        assert!(
            text.starts_with(r#"{"event":"leader","election":"web","namespace":"default","lock":"lease""#),
            "{text}"
        );
        assert_eq!(parse_event(text.trim_end().as_bytes()).unwrap(), ev);
        for code in [
            ErrorCode::LineTooLong,
            ErrorCode::SlowConsumer,
            ErrorCode::ForbiddenNamespace,
            ErrorCode::NotALock,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), Value::from(code.as_str()));
        }
        assert_eq!(ErrorCode::NotALock.as_str(), "not_a_lock");
        assert_eq!(LostReason::BrokerShutdown.to_string(), "broker_shutdown");
        assert_eq!(LockKind::Endpoints.to_string(), "endpoints");
    }

    #[test]
    fn dns1123() {
        assert!(is_dns1123_subdomain("my-app.v1"));
        assert!(!is_dns1123_subdomain("Bad_Name"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(is_dns1123_label("default"));
        assert!(!is_dns1123_label("a.b"));
    }
}
