"""The zfabric exception tree: one root, a few categories, each error carrying its evidence.

    FabricError
    ├── ConfigError           bad endpoint, option or argument (names what and where)
    │   └── TopologyError     a topology with problems (lists every one, each with key path and line)
    ├── CodecError
    │   ├── DecodeError       frames that are not a zfabric envelope (carries the raw frames)
    │   └── EncodeError       a body msgpack cannot represent
    ├── TransportError        a ZeroMQ call failed (carries the endpoint and errno)
    ├── ClosedError           the object was closed
    ├── FabricTimeout         (also a builtin TimeoutError)
    │   ├── SendTimeout       back-pressure: the queue stayed full for the whole timeout
    │   ├── ReceiveTimeout    nothing arrived in time
    │   ├── ReadyTimeout      a subscription or subscriber count was not confirmed in time
    │   ├── RequestTimeout    no reply after every attempt
    │   └── Unconfirmed       a reliable send got no confirm in time (lists confirmed and unconfirmed)
    ├── RemoteError           a replier's handler raised; carries the remote type and message
    ├── Rejected              a sidecar refused a message (unknown queue, not an envelope)
    ├── StoreError            a sidecar store cannot be opened or written (in use, disk, not WAL-capable)
    └── HandlerSignal         raised by a worker's handler to steer its message
        ├── RetryAfter        retry this message after a given delay
        └── DoNotRetry        this failure will not get better: dead-letter the message now

`zmq.ZMQError` is translated into `TransportError` at the socket boundary (`zfabric._socket`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class FabricError(Exception):
    """Root of every error zfabric raises on purpose."""


class ConfigError(FabricError, ValueError):
    """An endpoint, option or argument is invalid; the message names it."""


class TopologyError(ConfigError):
    """A topology that cannot be used; `problems` lists every one found, each naming its key path and line."""

    def __init__(self, problems: Sequence[str], source: str = "topology") -> None:
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems) if n > 1
                         else f"{self.problems[0]}" if n else head)


class CodecError(FabricError):
    """Encoding or decoding an envelope failed."""


class DecodeError(CodecError):
    """Frames that are not a valid zfabric envelope; `frames` holds them as received."""

    def __init__(self, reason: str, frames: Sequence[Any] = ()) -> None:  # bytes or buffers, kept as bytes
        self.reason = reason
        self.frames = [bytes(f) for f in frames]
        sizes = ", ".join(str(len(f)) for f in self.frames[:8])
        super().__init__(f"undecodable message: {reason} ({len(self.frames)} frame(s), sizes [{sizes}])")


class EncodeError(CodecError, TypeError):
    """A body or header value msgpack cannot encode."""


class TransportError(FabricError):
    """A ZeroMQ operation failed; carries the endpoint and errno."""

    def __init__(self, message: str, *, endpoint: str | None = None, errno: int | None = None) -> None:
        self.endpoint = endpoint
        self.errno = errno
        super().__init__(message if endpoint is None else f"{message} (endpoint {endpoint})")


class ClosedError(FabricError):
    """The socket owner was closed; no further I/O is possible."""


class FabricTimeout(FabricError, TimeoutError):
    """Something did not happen within the timeout the caller gave."""


class SendTimeout(FabricTimeout):
    """The peer's queue stayed full (high-water mark) for the whole send timeout; that message was not sent.

    From a batch send, `sent` lists the envelopes that did go out before it.
    """

    def __init__(self, message: str, sent: Sequence[Any] = ()) -> None:
        self.sent: list[Any] = list(sent)
        super().__init__(message)


class ReceiveTimeout(FabricTimeout):
    """No message arrived within the receive timeout."""


class ReadyTimeout(FabricTimeout):
    """A subscription or a subscriber count was not confirmed within the timeout."""


class RequestTimeout(FabricTimeout):
    """No reply arrived for a request after all its attempts."""

    def __init__(self, message: str, *, request_id: bytes, attempts: int, timeout: float) -> None:
        self.request_id = request_id
        self.attempts = attempts
        self.timeout = timeout
        super().__init__(message)


class RemoteError(FabricError):
    """A replier's handler raised; `type`, `message` and `remote_traceback` describe it."""

    def __init__(self, type: str, message: str, remote_traceback: str = "", *, member: str | None = None) -> None:
        self.type = type
        self.message = message
        self.remote_traceback = remote_traceback
        self.member = member
        where = f" at {member}" if member else ""
        super().__init__(f"{type}: {message}{where}")


class Unconfirmed(FabricTimeout):
    """Reliable sends that the sidecar did not confirm in time; they may or may not have been stored.

    `confirmed` and `unconfirmed` list the envelopes of the call on each side; resending an
    unconfirmed envelope (same id) never creates a duplicate.
    """

    def __init__(self, message: str, *, confirmed: Sequence[Any] = (), unconfirmed: Sequence[Any] = ()) -> None:
        self.confirmed: list[Any] = list(confirmed)
        self.unconfirmed: list[Any] = list(unconfirmed)
        super().__init__(message)


class Rejected(FabricError):
    """A sidecar refused a message and will never store it; `reason` says why."""

    def __init__(self, message: str, *, message_id: bytes | None = None, reason: str = "") -> None:
        self.message_id = message_id
        self.reason = reason
        super().__init__(message)


class HandlerSignal(FabricError):
    """Base of the exceptions a worker's handler raises to say what should become of its message."""


class RetryAfter(HandlerSignal):
    """Retry this message after `delay` seconds instead of the policy's backoff (still counts an attempt)."""

    def __init__(self, delay: float, reason: str = "") -> None:
        if delay < 0:
            raise ValueError(f"RetryAfter: delay must be >= 0, got {delay}")
        self.delay = float(delay)
        self.reason = reason
        super().__init__(reason or f"retry after {delay:g} s")


class DoNotRetry(HandlerSignal):
    """The failure is permanent (bad data, not a flaky dependency): dead-letter the message now."""


class StoreError(FabricError):
    """A sidecar's store cannot be opened or written: in use by a running sidecar, disk trouble, no WAL support."""
