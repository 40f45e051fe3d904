"""zfabric: a brokerless messaging fabric on ZeroMQ. This module only re-exports.

Lazily: each name is imported from its module on first use, so `import zfabric` costs a
few milliseconds and a process loads only the patterns it uses (importing every module at
once took about 0.45 s, paid by every service, CLI command and benchmark process).
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

    __version__: str

# Three lists of one set of names, each for its reader: the imports above for type checkers, `_MODULES` for the
# lazy import, `__all__` for linters and `import *`; tests/test_public_api.py checks they agree.
_MODULES: dict[str, tuple[str, ...]] = {
    "codec": ("decode", "decode_published", "encode", "encode_published"),
    "endpoint": ("Endpoint",),
    "envelope": ("Envelope", "IdSource", "Kind"),
    "errors": (
        "ClosedError", "CodecError", "ConfigError", "DecodeError", "DoNotRetry", "EncodeError", "FabricError",
        "FabricTimeout", "HandlerSignal", "ReadyTimeout", "ReceiveTimeout", "Rejected", "RemoteError", "RequestTimeout",
        "RetryAfter", "SendTimeout", "StoreError", "TopologyError", "TransportError", "Unconfirmed",
    ),
    "options": ("SocketOptions",),
    "patterns._flows": ("GatherResult", "MemberReply"),
    "patterns.forwarder": ("Forwarder",),
    "patterns.pubsub": ("AsyncPublisher", "AsyncSubscriber", "Publisher", "Subscriber"),
    "patterns.queue": ("AsyncConsumer", "AsyncProducer", "Consumer", "Producer"),
    "patterns.reliable": ("AsyncReliableProducer", "ReliableProducer"),
    "patterns.reqrep": ("AsyncReplier", "AsyncRequester", "Replier", "Requester"),
    "patterns.scatter": ("AsyncScatterer", "Scatterer"),
    "patterns.worker": ("AsyncWorker", "Worker"),
    "sidecar.client": ("OfflineDeadLetters", "SidecarClient"),
    "sidecar.config": ("SidecarConfig",),
    "sidecar.policy": ("RetryPolicy",),
    "sidecar.service": ("Sidecar", "SidecarProcess"),
    "sidecar.store": ("DeadLetterFilter", "MessageRecord"),
    "topology.fabric": ("Fabric",),
    "topology.load": ("load_topology",),
    "topology.model": ("Topology",),
}
"""Each submodule and the public names it provides."""
_HOME = {name: module for module, names in _MODULES.items() for name in names}


if not TYPE_CHECKING:  # hidden from type checkers, so that a misspelt name stays an error for them

    def __getattr__(name: str) -> object:
        """A public name, imported from its module the first time it is asked for (PEP 562)."""
        if name == "__version__":
            value: object = _version()
        elif name in _HOME:
            value = getattr(_import_module(f".{_HOME[name]}", __name__), name)
        else:
            raise AttributeError(f"module 'zfabric' has no attribute {name!r}")
        globals()[name] = value  # the next lookup finds it without this function
        return value


def __dir__() -> list[str]:
    """The public names (PEP 562), loaded or not."""
    return list(__all__)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zfabric")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+unknown"


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
