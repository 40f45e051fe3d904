"""The immutable message envelope every pattern sends; no I/O here."""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Kind(enum.IntEnum):
    """What an envelope is for; travels as a small integer (see docs/wire.md)."""

    MESSAGE = 0
    REQUEST = 1
    REPLY = 2
    ERROR = 3


class Envelope(NamedTuple):
    """One message: identity, routing, delivery bookkeeping, headers and body.

    `body` is any msgpack-serializable value, or raw bytes that travel verbatim.
    Envelopes never change; `with_attempt()` and `replace()` return new ones. (It is a
    NamedTuple because that is the cheapest immutable value Python builds, which matters
    on every send and receive; compare envelopes with each other, not with plain tuples.)
    """

    id: bytes
    kind: Kind = Kind.MESSAGE
    topic: str = ""
    body: Any = None
    correlation_id: bytes | None = None
    reply_to: str | None = None
    attempt: int = 1
    created_at: float = 0.0
    deadline: float | None = None
    headers: Mapping[str, Any] = _EMPTY
    seq: int | None = None

    @classmethod
    def new(
        cls,
        body: Any = None,
        *,
        kind: Kind = Kind.MESSAGE,
        topic: str = "",
        headers: Mapping[str, Any] | None = None,
        deadline: float | None = None,
        correlation_id: bytes | None = None,
    ) -> Envelope:
        """A fresh envelope with a random 16-byte id, stamped now."""
        return cls(
            id=os.urandom(16),
            kind=kind,
            topic=topic,
            body=body,
            correlation_id=correlation_id,
            created_at=time.time(),
            deadline=deadline,
            headers=headers if headers is not None else _EMPTY,
        )

    @property
    def id_hex(self) -> str:
        """The message id as 32 hex digits, for logs and the CLI."""
        return self.id.hex()

    def with_attempt(self, attempt: int) -> Envelope:
        """The same message with another attempt count (used by retries and redelivery)."""
        return self._replace(attempt=attempt)

    def replace(self, **changes: Any) -> Envelope:
        """A copy with the given fields changed (unknown field names raise ValueError)."""
        return self._replace(**changes)

    def expired(self, now: float | None = None) -> bool:
        """True when the envelope carries a deadline that has passed (wall clock, seconds)."""
        if self.deadline is None:
            return False
        return (time.time() if now is None else now) >= self.deadline

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (ids as hex), for the CLI and logs."""
        return {
            "id": self.id.hex(),
            "kind": self.kind.name.lower(),
            "topic": self.topic,
            "correlation_id": self.correlation_id.hex() if self.correlation_id else None,
            "reply_to": self.reply_to,
            "attempt": self.attempt,
            "created_at": self.created_at,
            "deadline": self.deadline,
            "headers": dict(self.headers),
            "seq": self.seq,
            "body": self.body,
        }


class IdSource:
    """Message ids for one sender: 8 random origin bytes, then a big-endian 8-byte counter.

    Cheaper than uuid4 on the hot path and unique per sender; `origin` also names the
    sender (a subscriber groups sequence numbers by it).
    """

    __slots__ = ("origin", "counter")

    def __init__(self, origin: bytes | None = None) -> None:
        self.origin = origin if origin is not None else os.urandom(8)
        self.counter = itertools.count(1)
        """Shared by everything that numbers this sender's messages (`next()`, codec.Stamp)."""

    def next(self) -> bytes:
        """The next id of this sender."""
        return self.origin + next(self.counter).to_bytes(8, "big")
