"""Protocol 1.1 of the elector broker's socket (PROTOCOL.md), kept in step with
client-lib/src/protocol.rs: typed events, error codes as exceptions, request encoding.

Fields and events this version does not know are ignored, so newer brokers keep working.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Type, Union

PROTOCOL_VERSION = 1
PROTOCOL_MINOR = 1
MAX_LINE_BYTES = 64 * 1024
DEFAULT_SOCKET_PATH = "/var/run/elector/elector.sock"

LOCK_LEASE = "lease"
LOCK_ENDPOINTS = "endpoints"


@dataclass(frozen=True)
class Timing:
    """Per-election timing in seconds; the broker fills in what is left out and requires
    lease_duration > renew_deadline > 1.2 x retry_period."""

    lease_duration: Optional[int] = None
    renew_deadline: Optional[float] = None
    retry_period: Optional[float] = None

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.lease_duration is not None:
            out["lease_duration"] = self.lease_duration
        if self.renew_deadline is not None:
            out["renew_deadline"] = self.renew_deadline
        if self.retry_period is not None:
            out["retry_period"] = self.retry_period
        return out


@dataclass(frozen=True)
class Hello:
    """The broker's greeting."""

    protocol: int
    broker_version: str
    node: str
    default_namespace: str
    caller_namespace: Optional[str] = None
    caller_pod: Optional[str] = None
    #: 1 from a protocol 1.1 broker (leaders' guarantees, jeopardy, resume); None from 1.0.
    protocol_minor: Optional[int] = None
    #: The broker's CLOCK_MONOTONIC in nanoseconds when it greeted (protocol 1.1).
    monotonic_now: Optional[int] = None


@dataclass(frozen=True)
class Leader:
    """Who leads an election now. ``leader`` is None when nobody holds a live lease, or when the
    broker cannot tell (then ``unknown`` says why). ``term`` only grows: a fencing token."""

    election: str
    namespace: str
    lock: str
    leader: Optional[str]
    term: Optional[int]
    is_me: bool
    unknown: Optional[str] = None


@dataclass(frozen=True)
class Elected:
    """This campaign now leads, in ``term``."""

    election: str
    namespace: str
    lock: str
    identity: str
    term: int
    #: Until when this leader may act without hearing more (CLOCK_MONOTONIC ns, see
    #: ``monotonic_ns()``); None from a 1.0 broker or when this process does not share the
    #: broker's clock (then a disconnect ends leadership at once).
    valid_until: Optional[int] = None


@dataclass(frozen=True)
class Lost:
    """This campaign no longer leads. ``reason``: resigned, renew_failed, preempted,
    broker_shutdown, or (client side) disconnected (the broker went away and there was no
    guarantee to lead on) or broker_unavailable (no broker confirmed the leadership before its
    guarantee ran out)."""

    election: str
    namespace: str
    lock: str
    identity: str
    term: int
    reason: str


@dataclass(frozen=True)
class Renewed:
    """The broker renewed this leader's lock: a fresh guarantee (``valid_until``, CLOCK_MONOTONIC
    ns). Protocol 1.1. Kept by the campaign (``valid_until``), not yielded as an event."""

    election: str
    namespace: str
    lock: str
    identity: str
    term: int
    valid_until: int


@dataclass(frozen=True)
class Jeopardy:
    """The broker went away while this campaign led (protocol 1.1). It goes on leading until
    ``valid_until`` (CLOCK_MONOTONIC ns) at most while the client reconnects and asks the broker
    to confirm it (``resume``): then ``Safe``, or ``Lost`` (``broker_unavailable``) exactly at
    ``valid_until``, or ``Lost`` (``preempted``) if the broker refuses."""

    election: str
    namespace: str
    lock: str
    identity: str
    term: int
    valid_until: int


@dataclass(frozen=True)
class Safe:
    """A broker confirmed the leadership after a jeopardy: same term, a fresh ``valid_until``."""

    election: str
    namespace: str
    lock: str
    identity: str
    term: int
    valid_until: int


Event = Union[Leader, Elected, Lost, Jeopardy, Safe]
WireEvent = Union[Leader, Elected, Lost, Renewed, Jeopardy, Safe]


@dataclass(frozen=True)
class ElectionStatus:
    election: str
    namespace: str
    lock: str
    identity: Optional[str]
    leader: Optional[str]
    term: Optional[int]
    is_me: bool


@dataclass(frozen=True)
class Status:
    campaigns: "list[ElectionStatus]"
    observations: "list[ElectionStatus]"


# --- errors -------------------------------------------------------------------------------


class ElectorError(Exception):
    """Base of every error of this package."""


class ConnectError(ElectorError):
    """The broker's socket cannot be reached (or it closed before greeting)."""


class ConnectionLost(ElectorError):
    """The connection broke before the broker answered."""


class ProtocolError(ElectorError):
    """The broker sent something this client cannot understand."""


class ClientClosed(ElectorError):
    """The client was closed."""


class BrokerError(ElectorError):
    """The broker refused a request. ``code`` is the protocol's stable error code; each known
    code has its own subclass (e.g. ``InvalidElectionError`` for ``invalid_election``)."""

    code: str = "unknown"

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(f"{code or self.code}: {message}")
        if code is not None:
            self.code = code
        self.message = message


ERROR_CODES = (
    "line_too_long", "invalid_utf8", "invalid_json", "invalid_request", "unknown_op",
    "invalid_election", "invalid_namespace", "invalid_identity", "invalid_timing",
    "already_campaigning", "not_campaigning", "not_observing", "identity_in_use",
    "too_many_campaigns", "too_many_connections", "forbidden_namespace", "forbidden_identity",
    "unattested", "timeout", "too_many_errors", "slow_consumer", "shutting_down", "internal",
    "api_forbidden", "not_a_lock",
)


def _class_name(code: str) -> str:
    # "timeout" would shadow the built-in TimeoutError.
    prefix = "Broker" if code == "timeout" else ""
    return prefix + "".join(part.capitalize() for part in code.split("_")) + "Error"


ERROR_CLASSES: Dict[str, Type[BrokerError]] = {
    code: type(_class_name(code), (BrokerError,), {"code": code, "__module__": "elector_client"})
    for code in ERROR_CODES
}

LineTooLongError = ERROR_CLASSES["line_too_long"]
InvalidUtf8Error = ERROR_CLASSES["invalid_utf8"]
InvalidJsonError = ERROR_CLASSES["invalid_json"]
InvalidRequestError = ERROR_CLASSES["invalid_request"]
UnknownOpError = ERROR_CLASSES["unknown_op"]
InvalidElectionError = ERROR_CLASSES["invalid_election"]
InvalidNamespaceError = ERROR_CLASSES["invalid_namespace"]
InvalidIdentityError = ERROR_CLASSES["invalid_identity"]
InvalidTimingError = ERROR_CLASSES["invalid_timing"]
AlreadyCampaigningError = ERROR_CLASSES["already_campaigning"]
NotCampaigningError = ERROR_CLASSES["not_campaigning"]
NotObservingError = ERROR_CLASSES["not_observing"]
IdentityInUseError = ERROR_CLASSES["identity_in_use"]
TooManyCampaignsError = ERROR_CLASSES["too_many_campaigns"]
TooManyConnectionsError = ERROR_CLASSES["too_many_connections"]
ForbiddenNamespaceError = ERROR_CLASSES["forbidden_namespace"]
ForbiddenIdentityError = ERROR_CLASSES["forbidden_identity"]
UnattestedError = ERROR_CLASSES["unattested"]
BrokerTimeoutError = ERROR_CLASSES["timeout"]
TooManyErrorsError = ERROR_CLASSES["too_many_errors"]
SlowConsumerError = ERROR_CLASSES["slow_consumer"]
ShuttingDownError = ERROR_CLASSES["shutting_down"]
InternalError = ERROR_CLASSES["internal"]
ApiForbiddenError = ERROR_CLASSES["api_forbidden"]
NotALockError = ERROR_CLASSES["not_a_lock"]


def broker_error(code: str, message: str) -> BrokerError:
    """The exception for a broker error code (a plain BrokerError for codes from newer brokers)."""
    cls = ERROR_CLASSES.get(code)
    return cls(message) if cls is not None else BrokerError(message, code)


# --- the node's monotonic clock ------------------------------------------------------------

#: How far apart the broker's greeting and our reading of CLOCK_MONOTONIC may be and still be
#: one clock (as client-lib/src/clock.rs): the greeting is read a little after it was written;
#: a clock of another time namespace or machine is off by far more (its boot time).
SHARED_CLOCK_TOLERANCE_NS = 1_000_000_000


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC now, in nanoseconds: the clock ``valid_until`` is stated on."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def shares_clock(hello: Hello) -> bool:
    """Whether this process reads the broker's CLOCK_MONOTONIC: the greeting's ``monotonic_now``
    (read before it was sent) is at most a second behind ours. Not so for a 1.0 broker."""
    if hello.monotonic_now is None:
        return False
    ours = monotonic_ns()
    return 0 <= ours - hello.monotonic_now <= SHARED_CLOCK_TOLERANCE_NS


# --- wire ----------------------------------------------------------------------------------


def encode(request: Dict[str, Any]) -> bytes:
    return (json.dumps(request, separators=(",", ":")) + "\n").encode("utf-8")


def decode(line: bytes) -> Optional[Dict[str, Any]]:
    """One broker line as a dict, or None if it is not a JSON object with an ``event``."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value


def _opt_int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _opt_nonneg(v: Any) -> Optional[int]:
    n = _opt_int(v)
    return n if n is not None and n >= 0 else None


def _opt_str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def parse_hello(msg: Dict[str, Any]) -> Hello:
    caller = msg.get("caller") if isinstance(msg.get("caller"), dict) else {}
    return Hello(
        protocol=_opt_int(msg.get("protocol")) or 0,
        broker_version=str(msg.get("broker_version", "")),
        node=str(msg.get("node", "")),
        default_namespace=_opt_str(msg.get("default_namespace")) or "default",
        caller_namespace=_opt_str(caller.get("namespace")),
        caller_pod=_opt_str(caller.get("pod")),
        protocol_minor=_opt_int(msg.get("protocol_minor")),
        monotonic_now=_opt_nonneg(msg.get("monotonic_now")),
    )


def parse_election_event(msg: Dict[str, Any]) -> Optional[WireEvent]:
    """A leader / elected / lost / renewed / jeopardy / safe event, or None for anything else
    (or a malformed one)."""
    kind = msg.get("event")
    election, namespace = _opt_str(msg.get("election")), _opt_str(msg.get("namespace"))
    lock = _opt_str(msg.get("lock")) or LOCK_LEASE
    if election is None or namespace is None:
        return None
    if kind == "leader":
        return Leader(
            election, namespace, lock,
            leader=_opt_str(msg.get("leader")),
            term=_opt_int(msg.get("term")),
            is_me=msg.get("is_me") is True,
            unknown=_opt_str(msg.get("unknown")),
        )
    identity, term = _opt_str(msg.get("identity")), _opt_int(msg.get("term"))
    if identity is None or term is None:
        return None
    if kind == "elected":
        return Elected(election, namespace, lock, identity, term, _opt_nonneg(msg.get("valid_until")))
    if kind == "lost":
        return Lost(election, namespace, lock, identity, term, _opt_str(msg.get("reason")) or "unknown")
    guarantee = {"renewed": Renewed, "jeopardy": Jeopardy, "safe": Safe}.get(str(kind))
    valid_until = _opt_nonneg(msg.get("valid_until"))
    if guarantee is not None and valid_until is not None:
        return guarantee(election, namespace, lock, identity, term, valid_until)  # type: ignore[no-any-return]
    return None


def _election_status(v: Any) -> Optional[ElectionStatus]:
    if not isinstance(v, dict):
        return None
    return ElectionStatus(
        election=str(v.get("election", "")),
        namespace=str(v.get("namespace", "")),
        lock=str(v.get("lock", LOCK_LEASE)),
        identity=_opt_str(v.get("identity")),
        leader=_opt_str(v.get("leader")),
        term=_opt_int(v.get("term")),
        is_me=v.get("is_me") is True,
    )


def parse_status(msg: Dict[str, Any]) -> Status:
    def items(key: str) -> "list[ElectionStatus]":
        raw = msg.get(key) if isinstance(msg.get(key), list) else []
        return [s for s in (_election_status(v) for v in raw) if s is not None]

    return Status(campaigns=items("campaigns"), observations=items("observations"))
