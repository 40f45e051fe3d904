"""zfabric: a brokerless messaging fabric on ZeroMQ. This module only re-exports."""

from importlib.metadata import PackageNotFoundError, version

from .codec import decode, decode_published, encode, encode_published
from .endpoint import Endpoint
from .envelope import Envelope, IdSource, Kind
from .errors import (
    ClosedError,
    CodecError,
    ConfigError,
    DecodeError,
    DoNotRetry,
    EncodeError,
    FabricError,
    FabricTimeout,
    HandlerSignal,
    ReadyTimeout,
    ReceiveTimeout,
    Rejected,
    RemoteError,
    RequestTimeout,
    RetryAfter,
    SendTimeout,
    StoreError,
    TopologyError,
    TransportError,
    Unconfirmed,
)
from .options import SocketOptions
from .patterns._flows import GatherResult, MemberReply
from .patterns.forwarder import Forwarder
from .patterns.pubsub import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber
from .patterns.queue import AsyncConsumer, AsyncProducer, Consumer, Producer
from .patterns.reliable import AsyncReliableProducer, ReliableProducer
from .patterns.reqrep import AsyncReplier, AsyncRequester, Replier, Requester
from .patterns.scatter import AsyncScatterer, Scatterer
from .patterns.worker import AsyncWorker, Worker
from .sidecar.client import OfflineDeadLetters, SidecarClient
from .sidecar.config import SidecarConfig
from .sidecar.policy import RetryPolicy
from .sidecar.service import Sidecar, SidecarProcess
from .sidecar.store import DeadLetterFilter, MessageRecord
from .topology.fabric import Fabric
from .topology.load import load_topology
from .topology.model import Topology

try:
    __version__ = version("zfabric")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AsyncConsumer",
    "AsyncProducer",
    "AsyncPublisher",
    "AsyncReliableProducer",
    "AsyncReplier",
    "AsyncRequester",
    "AsyncScatterer",
    "AsyncSubscriber",
    "AsyncWorker",
    "ClosedError",
    "CodecError",
    "ConfigError",
    "Consumer",
    "DeadLetterFilter",
    "DecodeError",
    "DoNotRetry",
    "EncodeError",
    "Endpoint",
    "Envelope",
    "Fabric",
    "FabricError",
    "FabricTimeout",
    "Forwarder",
    "GatherResult",
    "HandlerSignal",
    "IdSource",
    "Kind",
    "MemberReply",
    "MessageRecord",
    "OfflineDeadLetters",
    "Producer",
    "Publisher",
    "ReadyTimeout",
    "ReceiveTimeout",
    "Rejected",
    "ReliableProducer",
    "RemoteError",
    "Replier",
    "RequestTimeout",
    "Requester",
    "RetryAfter",
    "RetryPolicy",
    "Scatterer",
    "SendTimeout",
    "Sidecar",
    "SidecarClient",
    "SidecarConfig",
    "SidecarProcess",
    "SocketOptions",
    "StoreError",
    "Subscriber",
    "Topology",
    "TopologyError",
    "TransportError",
    "Unconfirmed",
    "Worker",
    "__version__",
    "decode",
    "decode_published",
    "encode",
    "encode_published",
    "load_topology",
]
