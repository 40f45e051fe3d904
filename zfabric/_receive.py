"""Receiving envelopes, written once: decode, count and skip what is not an envelope.

`Inbox` holds the no-I/O part; `SyncInbox` and `AsyncInbox` add only the receive call of
their face. A bad message is counted in `stats.decode_errors`, logged (throttled) and
skipped: a receive loop never dies of foreign bytes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import zmq

from . import codec
from ._counters import Counters
from ._logs import Throttled
from ._socket import SocketOwner, readable, recv_frames
from .envelope import Envelope
from .errors import DecodeError, ReceiveTimeout

log = logging.getLogger("zfabric")


_bad_input = Throttled(log)
_NOBLOCK = int(zmq.NOBLOCK)


def decode_counted(frames: Sequence[bytes], stats: Counters, who: str,
                   decode: Callable[[Sequence[bytes]], Any] = codec.decode) -> Any:
    """The envelope in `frames`, or None when they are not one: counted in `stats`, logged (throttled per `who`)."""
    try:
        env = decode(frames)
    except DecodeError as exc:
        stats.decode_errors += 1
        _bad_input.warning(who, "%s: %s", who, exc)
        return None
    stats.received += 1
    return env


class Inbox(SocketOwner):
    """The face-independent half of anything that receives envelopes."""

    stats: Counters
    _decode: Callable[[Sequence[bytes]], Envelope] = staticmethod(codec.decode)

    _pending: deque[Envelope] | None = None
    """Envelopes received while waiting for something else (a readiness probe), served first."""

    _batches = False
    """Point-to-point receivers also accept batches (many envelopes in one ZeroMQ message)."""

    def _accept(self, frames: list[bytes]) -> Envelope | None:
        """The envelope in `frames`, or None (counted and logged) when they are not one."""
        if self._batches and len(frames) == 2 and frames[0][:3] == codec.BATCH_PREFIX:
            return self._accept_batch(frames)
        env = decode_counted(frames, self.stats, self._who, self._decode)
        return None if env is None else self._after_accept(env)

    def _accept_batch(self, frames: list[bytes]) -> Envelope | None:
        envs = decode_counted(frames, self.stats, self._who, codec.decode_batch)
        if not envs:
            return None
        self.stats.received += len(envs) - 1
        if self._pending is None:
            self._pending = deque()
        self._pending.extend(envs[1:])
        return envs[0]

    def _after_accept(self, env: Envelope) -> Envelope | None:
        """Hook for patterns that look at each envelope (sequence gaps, control topics)."""
        return env


def _remaining_ms(deadline: float) -> int:
    """Milliseconds left until `deadline`, rounded up so a poll never spins; 0 once passed."""
    left = deadline - time.monotonic()
    return int(left * 1000) + 1 if left > 0 else 0


class SyncInbox(Inbox):
    """Blocking receive, with an optional timeout, and iteration."""

    def receive(self, timeout: float | None = None) -> Envelope:
        """The next valid envelope; raises ReceiveTimeout after `timeout` seconds (None: wait forever)."""
        self._check_open()
        if self._pending:
            return self._pending.popleft()
        sock = self._sock
        if timeout is None:
            while True:
                env = self._accept(recv_frames(sock))
                if env is not None:
                    return env
        deadline = time.monotonic() + timeout
        while True:
            if not readable(sock, _remaining_ms(deadline)):
                raise ReceiveTimeout(f"no message within {timeout:g} s on {self.endpoint}")
            env = self._accept(recv_frames(sock, _NOBLOCK))
            if env is not None:
                return env

    def __iter__(self) -> Iterator[Envelope]:
        while not self._closed:
            yield self.receive()


class AsyncInbox(Inbox):
    """Awaitable receive, with an optional timeout, and `async for`."""

    _asyncio = True

    async def receive(self, timeout: float | None = None) -> Envelope:
        """The next valid envelope; raises ReceiveTimeout after `timeout` seconds (None: wait forever)."""
        self._check_open()
        if self._pending:
            return self._pending.popleft()
        sock = self._sock
        if timeout is None:
            while True:
                env = self._accept(await sock.recv_multipart())
                if env is not None:
                    return env
        deadline = time.monotonic() + timeout
        while True:
            if not await sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                raise ReceiveTimeout(f"no message within {timeout:g} s on {self.endpoint}")
            env = self._accept(await sock.recv_multipart(zmq.NOBLOCK))
            if env is not None:
                return env

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while not self._closed:
            yield await self.receive()

