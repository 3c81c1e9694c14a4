"""elector-client: leader election for Kubernetes apps through the node's elector broker.

Standard library only. A blocking API (``Client``) and an asyncio one (``AsyncClient``) of the
same shape; both reconnect with back-off and campaign again by themselves, and report "not
leader" at once when the broker is unreachable. The wire format is PROTOCOL.md.

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
    PROTOCOL_VERSION,
    AlreadyCampaigningError,
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
    Leader,
    LineTooLongError,
    Lost,
    NotCampaigningError,
    NotObservingError,
    ProtocolError,
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
)
from ._sync import Campaign, Client, LeadershipSignal, Observation, leader_only

__version__ = "0.1.0"

__all__ = [
    "AlreadyCampaigningError", "AsyncCampaign", "AsyncClient", "AsyncObservation", "BrokerError",
    "BrokerTimeoutError", "Campaign", "Client", "ClientClosed", "ConnectError", "ConnectionLost",
    "DEFAULT_SOCKET_PATH", "ERROR_CLASSES", "ERROR_CODES", "Elected", "ElectionStatus", "ElectorError",
    "Event", "ForbiddenIdentityError", "ForbiddenNamespaceError", "Hello", "IdentityInUseError",
    "InternalError", "InvalidElectionError", "InvalidIdentityError", "InvalidJsonError",
    "InvalidNamespaceError", "InvalidRequestError", "InvalidTimingError", "InvalidUtf8Error",
    "LOCK_ENDPOINTS", "LOCK_LEASE", "Leader", "LeadershipLost", "LeadershipSignal", "LineTooLongError",
    "Lost", "NotCampaigningError", "NotObservingError", "Observation", "PROTOCOL_VERSION",
    "ProtocolError", "ShuttingDownError", "SlowConsumerError", "Status", "Timing",
    "TooManyCampaignsError", "TooManyConnectionsError", "TooManyErrorsError", "UnattestedError",
    "UnknownOpError", "broker_error", "leader_only",
]
