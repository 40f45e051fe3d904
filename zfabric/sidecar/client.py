"""Talking to a sidecar's dead letters and counters: over its control endpoint while it runs, or its store file when it does not.

`SidecarClient` and `OfflineDeadLetters` offer the same methods, so the CLI (and scripts)
work the same against either; replay and purge on the file refuse to run while a
sidecar holds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import zmq

from .._socket import AnyContext, SocketOwner, recv_frames, send_frames, wait_ms
from ..endpoint import parse_many
from ..errors import ConfigError, FabricError, FabricTimeout
from ..options import SocketOptions
from . import protocol as p
from .store import DeadLetterFilter, MessageRecord, Store, StoreLock

PAGE = 500


class SidecarClient(SocketOwner):
    """Control requests to a running sidecar (stats, dead letters); each call waits at most `timeout` seconds."""

    _socket_type = zmq.DEALER

    def __init__(self, endpoint: str, *, timeout: float = 5.0, options: SocketOptions | None = None,
                 context: AnyContext | None = None) -> None:
        super().__init__(parse_many(endpoint, bind=False, default_bind=False), options=options, context=context)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        """One control operation; FabricTimeout if the sidecar does not answer, FabricError if it refuses."""
        self._check_open()
        send_frames(self._sock, [p.CONTROL, p.pack({"op": op, **args})])
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(wait_ms(left), zmq.POLLIN):
                raise FabricTimeout(f"sidecar at {self.endpoint} did not answer {op!r} within {self.timeout:g} s "
                                    "(is it running? for a stopped sidecar use --store FILE)")
            frames = recv_frames(self._sock)
            if len(frames) == 2 and frames[0] == p.CONTROL_REPLY:
                return p.unpack(frames[1], "CTR")
            if len(frames) == 2 and frames[0] == p.CONTROL_ERROR:
                raise FabricError(f"sidecar at {self.endpoint} refused {op!r}: {p.unpack(frames[1], 'CTE')}")
            # anything else (a stray reply to an earlier, timed-out call) is skipped

    def stats(self) -> dict[str, Any]:
        """Counters, gauges, store totals, queues and workers of the running sidecar."""
        return dict(self.call("stats"))

    def dead_letters(self, flt: DeadLetterFilter = DeadLetterFilter(), *, history: bool = False) -> list[MessageRecord]:
        return [MessageRecord.from_wire(d) for d in self.call("dlq.list", filter=flt.to_wire(), history=history)]

    def count(self, flt: DeadLetterFilter = DeadLetterFilter()) -> int:
        return int(self.call("dlq.count", filter=flt.to_wire()))

    def record(self, ident: str | bytes) -> MessageRecord | None:
        d = self.call("dlq.show", id=ident)
        return None if d is None else MessageRecord.from_wire(d)

    def replay(self, flt: DeadLetterFilter) -> dict[str, Any]:
        return dict(self.call("dlq.replay", filter=flt.to_wire()))

    def purge(self, flt: DeadLetterFilter) -> int:
        return int(self.call("dlq.purge", filter=flt.to_wire())["purged"])


class OfflineDeadLetters:
    """The same operations on the store file of a stopped sidecar (replays wait there for its next start)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not os.path.exists(path):
            raise ConfigError(f"store {path}: no such file")
        self.path = path
        self._store = Store(path)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> OfflineDeadLetters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        return {"store": str(self.path), "stored": self._store.counts()}

    def dead_letters(self, flt: DeadLetterFilter = DeadLetterFilter(), *, history: bool = False) -> list[MessageRecord]:
        return self._store.dead_letters(flt, history=history)

    def count(self, flt: DeadLetterFilter = DeadLetterFilter()) -> int:
        return self._store.count_dead(flt)

    def record(self, ident: str | bytes) -> MessageRecord | None:
        return self._store.record(ident)

    def _write(self, fn: Any) -> Any:
        lock = StoreLock(self.path).acquire()
        try:
            self._store.begin()
            try:
                result = fn()
                self._store.commit()
            except BaseException:
                self._store.rollback()
                raise
            return result
        finally:
            lock.release()

    def replay(self, flt: DeadLetterFilter) -> dict[str, Any]:
        entries = self._write(lambda: self._store.replay(flt, time.time()))
        return {"replayed": len(entries), "ids": [e.id for e in entries], "not_served": []}

    def purge(self, flt: DeadLetterFilter) -> int:
        return int(self._write(lambda: self._store.purge(flt)))


DeadLetterAccess = SidecarClient | OfflineDeadLetters


def iter_dead_letters(access: DeadLetterAccess, flt: DeadLetterFilter, *, history: bool = True) -> Iterator[MessageRecord]:
    """Every matching dead letter, fetched a page at a time (exports of any size, bounded memory)."""
    after, left = flt.after_seq, flt.limit
    while left is None or left > 0:
        page = min(PAGE, left) if left is not None else PAGE
        records = access.dead_letters(DeadLetterFilter(flt.queue, flt.error_type, flt.since, flt.until, flt.ids, after, page),
                                      history=history)
        yield from records
        if len(records) < page:
            return
        after = records[-1].seq
        if left is not None:
            left -= len(records)


