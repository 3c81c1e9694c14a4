"""elector-client: leader election for Kubernetes apps through the node's elector broker.

Standard library only. A blocking API (``Client``) and an asyncio one (``AsyncClient``) of the
same shape; both reconnect with back-off and campaign again by themselves. When the broker goes
away, a leader with a guarantee on this node's clock (protocol 1.1) is in ``Jeopardy``: it goes
on leading while the client resumes it at the (next) broker, ending in ``Safe`` or ``Lost``
(``broker_unavailable``, exactly at ``valid_until``); without one it is ``Lost`` at once. The
wire format is PROTOCOL.md.

    from elector_client import Client, Elected, leader_only

    with Client("/var/run/elector/elector.sock") as client:
        campaign = client.campaign("my-job", identity="pod-a")
        for event in campaign:
            if isinstance(event, Elected):
                print("leading in term", event.term)
"""
from ._aio import AsyncCampaign, AsyncClient, AsyncObservation, LeadershipLost
from ._protocol import (
    DEFAULT_SOCKET_PATH,
    ERROR_CLASSES,
    ERROR_CODES,
    LOCK_ENDPOINTS,
    LOCK_LEASE,
    PROTOCOL_MINOR,
    PROTOCOL_VERSION,
    AlreadyCampaigningError,
    ApiForbiddenError,
    BrokerError,
    BrokerTimeoutError,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    Elected,
    ElectionStatus,
    ElectorError,
    Event,
    ForbiddenIdentityError,
    ForbiddenNamespaceError,
    Hello,
    IdentityInUseError,
    InternalError,
    InvalidElectionError,
    InvalidIdentityError,
    InvalidJsonError,
    InvalidNamespaceError,
    InvalidRequestError,
    InvalidTimingError,
    InvalidUtf8Error,
    Jeopardy,
    Leader,
    LineTooLongError,
    Lost,
    NotALockError,
    NotCampaigningError,
    NotObservingError,
    ProtocolError,
    Renewed,
    Safe,
    ShuttingDownError,
    SlowConsumerError,
    Status,
    Timing,
    TooManyCampaignsError,
    TooManyConnectionsError,
    TooManyErrorsError,
    UnattestedError,
    UnknownOpError,
    broker_error,
    monotonic_ns,
)
from ._sync import Campaign, Client, LeadershipSignal, Observation, leader_only

__version__ = "0.1.0"

__all__ = [
    "AlreadyCampaigningError", "ApiForbiddenError", "AsyncCampaign", "AsyncClient", "AsyncObservation", "BrokerError",
    "BrokerTimeoutError", "Campaign", "Client", "ClientClosed", "ConnectError", "ConnectionLost",
    "DEFAULT_SOCKET_PATH", "ERROR_CLASSES", "ERROR_CODES", "Elected", "ElectionStatus", "ElectorError",
    "Event", "ForbiddenIdentityError", "ForbiddenNamespaceError", "Hello", "IdentityInUseError",
    "InternalError", "InvalidElectionError", "InvalidIdentityError", "InvalidJsonError",
    "InvalidNamespaceError", "InvalidRequestError", "InvalidTimingError", "InvalidUtf8Error", "Jeopardy",
    "LOCK_ENDPOINTS", "LOCK_LEASE", "Leader", "LeadershipLost", "LeadershipSignal", "LineTooLongError",
    "Lost", "NotALockError", "NotCampaigningError", "NotObservingError", "Observation", "PROTOCOL_MINOR",
    "PROTOCOL_VERSION", "ProtocolError", "Renewed", "Safe", "ShuttingDownError", "SlowConsumerError", "Status", "Timing",
    "TooManyCampaignsError", "TooManyConnectionsError", "TooManyErrorsError", "UnattestedError",
    "UnknownOpError", "broker_error", "leader_only", "monotonic_ns",
]
