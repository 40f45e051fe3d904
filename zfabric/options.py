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
    """TCP keepalive probe interval on idle connections (rounded to whole seconds); 0 turns probes off.
    zfabric never sends ZMTP pings: with libzmq 4.3.5 a ping reaching a peer that had just closed reset the
    connection and lost what was in flight, and pings made a socket with a full queue abort the process when
    its peer left. Deadlines, retries and leases at the pattern level cover what pings would."""
    heartbeat_timeout_ms: int = 30_000
    """A peer whose host answers no keepalive probe for this long is dropped. A connection with messages in
    flight is judged by the kernel's retransmission limit instead (minutes); a frozen process is kept, since
    its kernel still answers, and gets what is queued for it when it resumes."""
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
