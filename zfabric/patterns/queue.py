"""Point-to-point queue (PUSH -> PULL): each message reaches exactly one consumer.

At-most-once and fast: ZeroMQ acknowledges nothing, so a consumer killed with messages
in its buffers loses them. Back-pressure is real: when every consumer's queue is full
(high-water mark), a producer (either face) takes up to BACKLOG_MAX more small messages into
its backlog, sent as batches as the consumers catch up (_backlog.py; `backlog=0` turns it
off); beyond that, or for large messages, `send` blocks, or raises SendTimeout after the
timeout given; nothing is dropped silently. Either side may bind; by default consumers
bind and producers connect.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq

from .. import codec
from .._counters import Counters
from .._receive import AsyncInbox, Inbox, SyncInbox, _remaining_ms
from .._socket import SEND, AnyContext, PeerWatch, SocketOwner, send_frames, wait_ms
from ..endpoint import EndpointArg, parse_many
from ..envelope import Envelope, IdSource
from ..errors import ConfigError, ReadyTimeout, SendTimeout
from ..options import UNSET, SocketOptions, Unset
from ._backlog import BACKLOG_MAX, BACKLOG_SMALL, AsyncBacklog, Backlog, log

_RAW = frozenset({bytes, bytearray, memoryview})
_INLINE = codec.INLINE_MAX
_NOBLOCK = int(zmq.NOBLOCK)
_SENT, _TO_BACKLOG, _NOT_OFFERED = object(), object(), object()
"""What `_offer` did with a message."""
BATCH_COUNT = 1000
"""Envelopes per batch message at most."""
BATCH_BYTES = 1 << 20
"""Body bytes per batch message, roughly, at most."""


@dataclass
class ProducerCounters(Counters):
    """Producer counters: `sent` (handed to ZeroMQ or to the backlog), sends that timed out under
    back-pressure, and what the backlog did."""

    send_timeouts: int = 0
    backlogged: int = 0
    """Messages that waited in the backlog because every consumer's queue was full."""
    batches_sent: int = 0
    """ZeroMQ messages the backlog sent carrying several messages."""
    backlog_dropped: int = 0
    """Backlog messages dropped at close because the linger ran out."""


class _ProducerBase(SocketOwner):
    """The no-I/O half of a producer: envelopes, frames, peer counting."""

    _socket_type = zmq.PUSH
    _tune = {zmq.IMMEDIATE: 1}
    _watch_peers = True
    _hand_over = True
    _peers: PeerWatch
    _backlog: Backlog | AsyncBacklog

    def __init__(
        self,
        endpoints: EndpointArg,
        *,
        bind: bool | None = None,
        queue: str = "",
        send_timeout: float | None = None,
        backlog: int = BACKLOG_MAX,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        if type(backlog) is not int or backlog < 0:
            raise ConfigError(f"backlog: expected a number of messages, 0 or more, got {backlog!r}")
        super().__init__(parse_many(endpoints, bind=bind, default_bind=False), options=options, context=context)
        self.queue = queue
        self.send_timeout = send_timeout
        self.stats = ProducerCounters()
        self._ids = IdSource()
        self._stamp = codec.Stamp(self._ids, queue)
        if self._asyncio:
            self._backlog = AsyncBacklog(self._sync_sock, self._sock, self._who, self.stats)
        else:
            self._backlog = Backlog(self._sock, self._who, self.stats)
        self._backlog.limit = backlog

    def _encode(self, body: Any, headers: Mapping[str, Any] | None, ttl: float | None) -> tuple[Envelope, list[Any]]:
        """A new message's envelope and frames, encoded in one pass (the per-message hot path)."""
        now = time.time()
        if headers is None and ttl is None and codec.is_plain(body):
            env, message = self._stamp.plain(body, now)
            return env, [message]
        return self._stamp.encode(body, now, None if ttl is None else now + ttl, headers)

    def _batches(self, bodies: Iterable[Any], headers: Mapping[str, Any] | None,
                 ttl: float | None) -> list[tuple[list[Envelope], list[Any]]]:
        """(envelopes, frames) per ZeroMQ message: up to BATCH_COUNT small messages or BATCH_BYTES together
        (each encoded once, as a one-frame message is exactly a batch entry); a large body goes alone. All are
        encoded before the first is sent: a body that cannot be encoded fails the call with nothing sent."""
        now = time.time()
        return self._stamp.batches(bodies, now, None if ttl is None else now + ttl, headers, BATCH_COUNT, BATCH_BYTES)

    def _over_inproc(self, count: int) -> bool:
        """True when wait_for_consumers must poll the socket itself for POLLOUT: the monitor sees no inproc:// peers.

        (A producer that connects before its inproc consumer binds is writable at once: libzmq
        queues for the consumer and delivers when it binds, so nothing is lost by not waiting.)
        """
        if not any(ep.transport == "inproc" for ep in self._endpoint_specs):
            return False
        if count != 1:  # ZeroMQ reports no connections over inproc://; a writable PUSH proves one consumer only
            raise ConfigError(f"wait_for_consumers({count}): over inproc:// only one consumer can be waited for "
                              "(ZeroMQ reports no inproc connections)")
        return True

    def _timeout(self, timeout: float | None | Unset) -> float | None:
        return self.send_timeout if timeout is UNSET else timeout

    def _offer(self, frames: list[Any], may_backlog: bool) -> object:
        """With the backlog empty, a message that may start it (`may_backlog`, small, one frame): _SENT if the
        socket took it now, _TO_BACKLOG if every queue is full and a consumer is connected (with none at all,
        a send blocks or times out instead); else _NOT_OFFERED, and the caller sends it waiting."""
        if not may_backlog or len(frames) != 1 or len(frames[0]) > BACKLOG_SMALL:
            return _NOT_OFFERED
        try:
            SEND(self._sync_sock, frames[0], _NOBLOCK)
            return _SENT
        except zmq.Again:
            return _TO_BACKLOG if self._peers.drain() > 0 else _NOT_OFFERED

    def close(self, linger_ms: int | None = None) -> None:
        """Send what the backlog holds (within the linger), then close as every socket owner does."""
        if not self._closed:
            linger = self.options.linger_ms if linger_ms is None else linger_ms
            started = time.monotonic()
            dropped = self._backlog.close(None if linger < 0 else linger / 1000)
            if dropped:
                log.warning("%s closed after its whole linger of %d ms: %d message(s) of its backlog were never sent, "
                            "and what ZeroMQ still queued was dropped (consumers slow or gone); raise "
                            "SocketOptions.linger_ms to wait longer", self._who, linger, dropped)
                linger_ms = 0
            else:
                linger_ms = linger if linger <= 0 else max(0, linger - int((time.monotonic() - started) * 1000))
        super().close(linger_ms)

    def _timed_out(self, timeout: float) -> SendTimeout:
        self.stats.send_timeouts += 1
        return SendTimeout(f"queue full: no consumer accepted the message within {timeout:g} s ({', '.join(self.endpoints)})")


class Producer(_ProducerBase):
    """Sends messages to consumers, one consumer per message, round-robin.

    While every consumer's queue is full, small messages wait in a bounded backlog that a
    thread sends as batches once there is room (see _backlog.py): same messages, same order.
    `backlog` bounds it (messages; default BACKLOG_MAX); 0 turns it off, so that `send` waits
    as soon as the high-water marks are reached, as a raw PUSH socket's does.
    """

    _backlog: Backlog

    def send(self, body: Any, *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
             timeout: float | None | Unset = UNSET) -> Envelope:
        """Send one message; returns its envelope. Blocks while the queue is full, at most `timeout` s."""
        if self._closed:
            self._check_open()
        limit = self.send_timeout if timeout is UNSET else timeout
        if headers is None and ttl is None and (type(body) not in _RAW or
                                                type(body) is bytes and len(body) < _INLINE):
            # _encode's plain case (codec.is_plain), and _send's common cases, inlined: the hottest path
            env, message = self._stamp.plain(body, time.time())
            backlog = self._backlog
            if not backlog.waiting and backlog.idle:  # (see _send: everything went out; the socket is this thread's)
                try:  # blocking when a full queue leaves nothing else to do (a large message, no timeout)
                    SEND(self._sock, message, 0 if limit is None and len(message) > BACKLOG_SMALL else _NOBLOCK)
                    self.stats.sent += 1
                    return env
                except zmq.Again:
                    pass
            elif backlog.take(message):  # behind the backlog, if it has room (no lock: see Backlog)
                self.stats.sent += 1
                return env
            frames = [message]
        else:
            env, frames = self._encode(body, headers, ttl)
        self._send(frames, limit, may_backlog=self._backlog.limit > 0)  # type: ignore[arg-type]
        self.stats.sent += 1
        return env

    def send_envelope(self, env: Envelope, *, timeout: float | None | Unset = UNSET) -> None:
        """Send a ready-made envelope (e.g. one being redelivered) as it is."""
        self._check_open()
        self._send(codec.encode(env), self._timeout(timeout))
        self.stats.sent += 1

    def _send(self, frames: list[Any], timeout: float | None, *, may_backlog: bool = False) -> None:
        """Send one message, in order: behind the backlog while it holds anything; else at once; else, when every
        queue is full, a small message (`may_backlog`) into the backlog if a consumer is connected; else
        blocking, as long as `timeout` allows."""
        backlog = self._backlog
        if backlog.active:
            with backlog.lock:
                if backlog.active:  # still (the flusher may have sent it all meanwhile)
                    if not backlog.put(frames, timeout):
                        raise self._timed_out(timeout)  # type: ignore[arg-type]
                    return
        # The backlog is empty and its flusher asleep: everything in it went out. Only this thread adds to it,
        # so it stays so, and the flusher has finished with the socket: no lock is needed to use it.
        offered = self._offer(frames, may_backlog)
        if offered is _SENT:
            return
        if offered is _TO_BACKLOG:
            with backlog.lock:
                taken = backlog.put(frames, timeout)
            if not taken:
                raise self._timed_out(timeout)  # type: ignore[arg-type]
            return
        self._send_blocking(frames, timeout)

    def _send_blocking(self, frames: list[Any], timeout: float | None) -> None:
        sock = self._sock
        if timeout is None:
            send_frames(sock, frames)
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                send_frames(sock, frames, _NOBLOCK)
                return
            except zmq.Again:
                if not sock.poll(_remaining_ms(deadline), zmq.POLLOUT):
                    raise self._timed_out(timeout) from None

    def send_batch(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
                   timeout: float | None | Unset = UNSET) -> list[Envelope]:
        """Send many messages in few ZeroMQ messages (up to 1,000 or 1 MiB each): several times the
        throughput of one send per message. Each batch goes to one consumer, whole.

        The timeout applies to each batch; on SendTimeout, its `sent` lists what went out before.
        """
        self._check_open()
        limit = self._timeout(timeout)
        sent: list[Envelope] = []
        for envs, frames in self._batches(bodies, headers, ttl):
            try:
                self._send(frames, limit)
            except SendTimeout as exc:
                exc.sent = sent
                raise
            sent += envs
            self.stats.sent += len(envs)
        return sent

    def send_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None,
                  timeout: float | None | Unset = UNSET) -> list[Envelope]:
        """Send each body in turn; returns the envelopes sent.

        The timeout applies to each message; on the first SendTimeout, its `sent` attribute
        lists what went out before it.
        """
        sent: list[Envelope] = []
        try:
            for body in bodies:
                sent.append(self.send(body, headers=headers, timeout=timeout))
        except SendTimeout as exc:
            exc.sent = sent
            raise
        return sent

    def wait_for_consumers(self, count: int = 1, timeout: float = 10.0) -> int:
        """Block until `count` consumers are connected, so a burst is spread over all of them."""
        if self._over_inproc(count):
            if not self._sock.poll(wait_ms(timeout), zmq.POLLOUT):
                raise ReadyTimeout(f"no consumer connected after {timeout:g} s")
            return 1
        deadline = time.monotonic() + timeout
        while self._peers.drain() < count:
            if not self._peers.socket.poll(_remaining_ms(deadline), zmq.POLLIN):
                raise ReadyTimeout(f"{self._peers.peers} of {count} consumer(s) connected after {timeout:g} s")
        return self._peers.peers


class AsyncProducer(_ProducerBase):
    """The asyncio face of Producer, with the same backlog, sent by a task on the event loop.

    `async with` sends what the backlog holds (within the linger) before closing; a plain close()
    does the same without awaiting, holding up the event loop for at most the linger.
    """

    _asyncio = True
    _backlog: AsyncBacklog

    async def send(self, body: Any, *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
                   timeout: float | None | Unset = UNSET) -> Envelope:
        """Send one message; returns its envelope. Waits while the queue is full, at most `timeout` s."""
        if self._closed:
            self._check_open()
        if headers is None and ttl is None and (type(body) not in _RAW or
                                                type(body) is bytes and len(body) < _INLINE):
            env, message = self._stamp.plain(body, time.time())  # _encode's plain case, inlined: the hottest path
            frames = [message]
        else:
            env, frames = self._encode(body, headers, ttl)
        backlog = self._backlog
        if backlog.active:
            if len(frames) == 1 and backlog.take(frames[0]):  # behind the backlog, with room: no coroutine more
                self.stats.sent += 1
                return env
        else:
            try:  # what the socket takes now goes at once, without a coroutine per layer (see _asend)
                if len(frames) == 1:  # the commonest message, in one compiled send (the shadow, once made: no property)
                    SEND(self._shadow or self._sync_sock, frames[0], _NOBLOCK)
                else:
                    send_frames(self._sync_sock, frames, _NOBLOCK)
                self.stats.sent += 1
                return env
            except zmq.Again:
                pass
        await self._send(frames, self._timeout(timeout), may_backlog=backlog.limit > 0)
        self.stats.sent += 1
        return env

    async def send_envelope(self, env: Envelope, *, timeout: float | None | Unset = UNSET) -> None:
        """Send a ready-made envelope as it is."""
        self._check_open()
        await self._send(codec.encode(env), self._timeout(timeout))
        self.stats.sent += 1

    async def _send(self, frames: list[Any], timeout: float | None, *, may_backlog: bool = False) -> None:
        """Send one message, in order: behind the backlog while it holds anything; else at once; else, when every
        queue is full, a small message (`may_backlog`) into the backlog if a consumer is connected; else waiting,
        as long as `timeout` allows (the sync face's `_send`, with the waits awaited)."""
        backlog = self._backlog
        if backlog.active:
            if not await backlog.put(frames, timeout):
                raise self._timed_out(timeout)  # type: ignore[arg-type]
            return
        offered = self._offer(frames, may_backlog)
        if offered is _SENT or (offered is _TO_BACKLOG and backlog.add(frames)):
            return
        try:
            await self._asend(frames, timeout)
        except TimeoutError:
            raise self._timed_out(timeout) from None  # type: ignore[arg-type]

    async def send_batch(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None,
                         ttl: float | None = None, timeout: float | None | Unset = UNSET) -> list[Envelope]:
        """Send many messages in few ZeroMQ messages (see Producer.send_batch)."""
        self._check_open()
        limit = self._timeout(timeout)
        sent: list[Envelope] = []
        for envs, frames in self._batches(bodies, headers, ttl):
            try:
                await self._send(frames, limit)
            except SendTimeout as exc:
                exc.sent = sent
                raise
            sent += envs
            self.stats.sent += len(envs)
        return sent

    async def send_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None,
                        timeout: float | None | Unset = UNSET) -> list[Envelope]:
        """Send each body in turn; returns the envelopes sent (on SendTimeout, in its `sent`)."""
        sent: list[Envelope] = []
        try:
            for body in bodies:
                sent.append(await self.send(body, headers=headers, timeout=timeout))
        except SendTimeout as exc:
            exc.sent = sent
            raise
        return sent

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        """Send what the backlog holds, awaiting it within the linger, then close."""
        linger = self.options.linger_ms
        if not self._closed and self._backlog.active and linger > 0:
            started = time.monotonic()
            await self._backlog.wait_empty(linger / 1000)
            linger = max(0, linger - int((time.monotonic() - started) * 1000))
        self.close(linger)

    async def wait_for_consumers(self, count: int = 1, timeout: float = 10.0) -> int:
        """Wait until `count` consumers are connected."""
        if self._over_inproc(count):
            if not await self._sock.poll(wait_ms(timeout), zmq.POLLOUT):
                raise ReadyTimeout(f"no consumer connected after {timeout:g} s")
            return 1
        deadline = time.monotonic() + timeout
        while self._peers.drain() < count:
            if not await self._peers.socket.poll(_remaining_ms(deadline), zmq.POLLIN):
                raise ReadyTimeout(f"{self._peers.peers} of {count} consumer(s) connected after {timeout:g} s")
        return self._peers.peers


class _ConsumerBase(Inbox):
    _socket_type = zmq.PULL
    _batches = True
    _one_frame = True

    def __init__(
        self,
        endpoints: EndpointArg,
        *,
        bind: bool | None = None,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        super().__init__(parse_many(endpoints, bind=bind, default_bind=True), options=options, context=context)
        self.stats = Counters()


class Consumer(_ConsumerBase, SyncInbox):
    """Receives queue messages: `receive(timeout)` or `for env in consumer`."""


class AsyncConsumer(_ConsumerBase, AsyncInbox):
    """The asyncio face of Consumer: `await receive(timeout)` or `async for env in consumer`."""
