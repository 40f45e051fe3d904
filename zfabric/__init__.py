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
    EncodeError,
    FabricError,
    FabricTimeout,
    ReadyTimeout,
    ReceiveTimeout,
    RemoteError,
    RequestTimeout,
    SendTimeout,
    TransportError,
)
from .options import SocketOptions
from .patterns._flows import GatherResult, MemberReply
from .patterns.forwarder import Forwarder
from .patterns.pubsub import AsyncPublisher, AsyncSubscriber, Publisher, Subscriber
from .patterns.queue import AsyncConsumer, AsyncProducer, Consumer, Producer
from .patterns.reqrep import AsyncReplier, AsyncRequester, Replier, Requester
from .patterns.scatter import AsyncScatterer, Scatterer

try:
    __version__ = version("zfabric")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AsyncConsumer",
    "AsyncProducer",
    "AsyncPublisher",
    "AsyncReplier",
    "AsyncRequester",
    "AsyncScatterer",
    "AsyncSubscriber",
    "ClosedError",
    "CodecError",
    "ConfigError",
    "Consumer",
    "DecodeError",
    "EncodeError",
    "Endpoint",
    "Envelope",
    "FabricError",
    "FabricTimeout",
    "Forwarder",
    "GatherResult",
    "IdSource",
    "Kind",
    "MemberReply",
    "Producer",
    "Publisher",
    "ReadyTimeout",
    "ReceiveTimeout",
    "RemoteError",
    "Replier",
    "RequestTimeout",
    "Requester",
    "Scatterer",
    "SendTimeout",
    "SocketOptions",
    "Subscriber",
    "TransportError",
    "__version__",
    "decode",
    "decode_published",
    "encode",
    "encode_published",
]
