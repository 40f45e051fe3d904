"""Receiving envelopes, written once: decode, count and skip what is not an envelope.

`Inbox` holds the no-I/O part; `SyncInbox` and `AsyncInbox` add only the receive call of
their face. A bad message is counted in `stats.decode_errors`, logged (throttled) and
skipped: a receive loop never dies of foreign bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import zmq

from . import codec
from ._counters import Counters
from ._logs import Throttled
from ._socket import RECV, SocketOwner, peer_of, readable, rearm, recv_rest, wait_ms
from .envelope import Envelope
from .errors import DecodeError, ReceiveTimeout

log = logging.getLogger("zfabric")


_bad_input = Throttled(log)
MAX_PEERS_COUNTED = 1024
"""Distinct senders of bad input counted one by one; beyond that they are counted together as "others"."""
_NOBLOCK = int(zmq.NOBLOCK)
_decode_message = codec.decode_message


def count_bad(exc: DecodeError, stats: Counters, who: str, peer: str | None = None,
              by_peer: dict[str, int] | None = None) -> None:
    """Count one undecodable message (also per `peer` in `by_peer`) and log it, at most once per interval
    per receiver and peer: a hostile sender cannot flood the log."""
    stats.decode_errors += 1
    if peer is None or by_peer is None:
        _bad_input.warning(who, "%s: %s", who, exc)
        return
    key = peer if peer in by_peer or len(by_peer) < MAX_PEERS_COUNTED else "others"
    by_peer[key] = by_peer.get(key, 0) + 1
    _bad_input.warning(f"{who}|{peer}", "%s: from %s: %s", who, peer, exc)


def decode_counted(frames: Sequence[bytes], stats: Counters, who: str,
                   decode: Callable[[Sequence[bytes]], Any] = codec.decode) -> Any:
    """The envelope in `frames`, or None when they are not one: counted in `stats`, logged (throttled per `who`)."""
    try:
        env = decode(frames)
    except DecodeError as exc:
        count_bad(exc, stats, who)
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

    _bad_peers: dict[str, int] | None = None

    @property
    def bad_peers(self) -> dict[str, int]:
        """Undecodable messages per sender (its key's name with CURVE, else its IP address)."""
        if self._bad_peers is None:
            self._bad_peers = {}
        return self._bad_peers

    def _accept(self, frames: list[bytes], first: zmq.Frame | None = None) -> Envelope | None:
        """The envelope in `frames`, or None (counted per sender and logged) when they are not one."""
        if self._batches and len(frames) == 2 and frames[0][:3] == codec.BATCH_PREFIX:
            return self._accept_batch(frames, first)
        try:
            env = self._decode(frames)
        except DecodeError as exc:
            self._refuse(exc, first)
            return None
        self.stats.received += 1
        return self._after_accept(env)

    _one_frame = False
    """Receivers of `[message]` frames (queues) decode a one-frame message in `_take` itself."""

    _plain = True
    """No `_after_accept` hook: the fast path skips the call."""

    def _take(self, sock: zmq.Socket[Any], first: zmq.Frame) -> Envelope | None:
        """The envelope in the message whose first frame was just received on sync `sock` (which
        holds the rest), or None when it held none (counted). The hottest receive path: no call it can spare."""
        if first.more:
            return self._accept(recv_rest(sock, first), first)
        if not self._one_frame:
            return self._accept([first.bytes], first)
        try:
            env = _decode_message(first)  # msgpack reads the frame's own buffer: no copy of it into bytes first
        except DecodeError as exc:
            self._refuse(exc, first)
            return None
        self.stats.received += 1
        return env if self._plain else self._after_accept(env)

    def _refuse(self, exc: DecodeError, first: zmq.Frame | None) -> None:
        count_bad(exc, self.stats, self._who, peer_of(first), self.bad_peers)

    def _accept_batch(self, frames: list[bytes], first: zmq.Frame | None = None) -> Envelope | None:
        try:
            envs = codec.decode_batch(frames)
        except DecodeError as exc:
            self._refuse(exc, first)
            return None
        self.stats.received += 1
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
    return wait_ms(deadline - time.monotonic())


class SyncInbox(Inbox):
    """Blocking receive, with an optional timeout, and iteration."""

    def receive(self, timeout: float | None = None) -> Envelope:
        """The next valid envelope; raises ReceiveTimeout after `timeout` seconds (None: wait forever)."""
        if self._pending:
            return self._pending.popleft()
        if self._closed:
            self._check_open()
        sock = self._sock
        deadline = None
        while True:
            if timeout is None:  # a receive that waits costs what one that does not does when a message is there
                first = RECV(sock, 0, False)
            else:
                try:
                    first = RECV(sock, _NOBLOCK, False)
                except zmq.Again:  # nothing waiting (an exception: about 4 us), so wait for it
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    if not readable(sock, _remaining_ms(deadline)):
                        raise ReceiveTimeout(f"no message within {timeout:g} s on {self.endpoint}") from None
                    continue
            env = self._take(sock, first)
            if env is not None:
                return env

    def __iter__(self) -> Iterator[Envelope]:
        while not self._closed:
            yield self.receive()


class AsyncInbox(Inbox):
    """Awaitable receive, with an optional timeout, and `async for`; any number of tasks may share it."""

    _asyncio = True
    _waiters = 0
    """Tasks in receive() waiting for the socket."""
    _wake: asyncio.Future[None] | None = None
    """Resolved to wake every waiter: a receive left envelopes of a batch in `_pending` for them."""

    async def receive(self, timeout: float | None = None) -> Envelope:
        """The next valid envelope; raises ReceiveTimeout after `timeout` seconds (None: wait forever)."""
        if self._closed:
            self._check_open()
        if self._pending:
            return self._pending.popleft()
        sync = self._shadow or self._sync_sock
        deadline = None
        while True:
            try:  # what is waiting is received at once, as in the sync face; only waiting goes through the loop
                first = RECV(sync, _NOBLOCK, False)
            except zmq.Again:
                if deadline is None and timeout is not None:
                    deadline = time.monotonic() + timeout
                if not await self._wait(deadline):
                    raise ReceiveTimeout(f"no message within {timeout:g} s on {self.endpoint}") from None
                if self._pending:
                    return self._pending.popleft()
                continue
            env = self._take(sync, first)
            if self._waiters:
                self._wake_others()
            if env is not None:
                return env

    async def _wait(self, deadline: float | None) -> bool:
        """Until the socket may hold a message, or another receive wakes the waiters; False if `deadline` passed
        with neither. Either may wake with nothing to take: the caller tries again."""
        poll = self._sock.poll(None if deadline is None else _remaining_ms(deadline), zmq.POLLIN)
        wake = self._wake
        if wake is None or wake.done():
            wake = self._wake = asyncio.get_running_loop().create_future()
        self._waiters += 1
        try:
            await asyncio.wait((poll, wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters -= 1
            if not poll.done():
                poll.cancel()
        if deadline is None or wake.done() or time.monotonic() < deadline:
            return True
        return not poll.cancelled() and bool(poll.result())

    def _wake_others(self) -> None:
        """After a receive while other tasks wait: wake them all for envelopes it left in `_pending`, and make
        pyzmq look at the socket again (see `rearm`)."""
        if self._pending and self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        rearm(self._sock)

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while not self._closed:
            yield await self.receive()

