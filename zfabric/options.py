"""Socket options, timeouts and limits, with every default in one place."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .security.curve import Curve


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """What every zfabric socket is configured with; frozen, validated, shared freely.

    The defaults answer ZeroMQ's silent failure modes: a bounded linger (closing never
    hangs), heartbeats (a dead or frozen peer is noticed in seconds, not minutes), a
    maximum message size (an oversize frame cannot exhaust memory) and reconnect backoff.
    """

    send_hwm: int = 1000
    """Messages queued per peer before sends block (queue, request) or drop (publish)."""
    receive_hwm: int = 1000
    """Messages queued per peer on the receiving side."""
    linger_ms: int = 1000
    """How long close() may spend flushing unsent messages; never -1 (that can hang forever)."""
    max_message_size: int = 64 * 1024 * 1024
    """Largest inbound message in bytes; a peer that sends more is disconnected. -1: no limit."""
    heartbeat_ivl_ms: int = 1000
    """Liveness probe interval; 0 turns probes off. Sockets that send and receive (request-reply, scatter-gather,
    sidecars) send ZMTP pings. One-way sockets (queues, pub/sub, the forwarder) use TCP keepalive instead: a ping
    that reaches a peer which has just closed its end makes Linux reset the connection, and the reset throws away
    every message still in flight to that peer."""
    heartbeat_timeout_ms: int = 30_000
    """A peer silent this long is dropped (for one-way sockets: a peer that answers no keepalive probe). Not lower
    than seconds of backlog: libzmq can miss a PONG queued behind a saturated stream, and a dropped connection loses
    what its pipes held (measured: 3 s lost 1-2% of a 1,000,000-message burst to a slow consumer; 30 s lost none)."""
    reconnect_ivl_ms: int = 100
    """First reconnect delay after a lost connection."""
    reconnect_ivl_max_ms: int = 2000
    """Reconnect backoff ceiling."""
    curve: Curve | None = None
    """CURVE encryption and authentication (zfabric.security.curve.Curve); None: plain TCP."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "curve":
                continue
            value = getattr(self, f.name)
            if type(value) is not int:
                raise ConfigError(f"SocketOptions.{f.name}: expected an integer, got {value!r}")
        for name in ("send_hwm", "receive_hwm", "linger_ms", "heartbeat_ivl_ms", "heartbeat_timeout_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SocketOptions.{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_message_size == 0 or self.max_message_size < -1:
            raise ConfigError(f"SocketOptions.max_message_size: must be positive or -1, got {self.max_message_size}")
        if self.reconnect_ivl_ms < 1 or self.reconnect_ivl_max_ms < self.reconnect_ivl_ms:
            raise ConfigError("SocketOptions: reconnect_ivl_ms must be >= 1 and <= reconnect_ivl_max_ms")
        if self.curve is not None:
            from .security.curve import Curve

            if not isinstance(self.curve, Curve):
                raise ConfigError(f"SocketOptions.curve: expected a zfabric Curve, got {type(self.curve).__name__}")

    def replace(self, **changes: Any) -> SocketOptions:
        """A copy with the given options changed (validated again)."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(f"SocketOptions: {exc}; known options: {names}") from None


DEFAULT_OPTIONS = SocketOptions()


def check_keys(data: Any, known: list[str], path: str = "") -> None:
    """ConfigError for the first key of a config mapping that is not in `known`, with a "did you mean"."""
    import difflib

    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ConfigError(f"{path + '.' if path else ''}{key}: unknown key; {hint}")


class Unset(enum.Enum):
    """Marks an argument the caller did not give, where None has a meaning of its own."""

    token = 0


UNSET = Unset.token

DEFAULT_FORWARDER_XSUB = "tcp://127.0.0.1:5559"
"""Where a forwarder listens for publishers by default."""
DEFAULT_FORWARDER_XPUB = "tcp://127.0.0.1:5560"
"""Where a forwarder listens for subscribers by default."""

DEFAULT_REQUEST_TIMEOUT = 5.0
"""Seconds a request waits for its reply per attempt."""
DEFAULT_REQUEST_RETRIES = 2
"""Extra attempts after the first times out (Lazy Pirate)."""
