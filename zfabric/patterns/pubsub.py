"""Publish-subscribe: PUB -> forwarder (XSUB|XPUB) -> SUB, with topic prefix subscriptions.

ZeroMQ drops pub/sub messages silently (a slow joiner, a full high-water mark); zfabric
makes both visible and avoidable:
- `Subscriber.wait_ready()` returns once the forwarder has its subscriptions;
- `Publisher.wait_for_subscribers(n, topic)` returns once n subscriptions match `topic`;
- every message carries a per-publisher, per-topic sequence number, so a subscriber counts
  each message it missed in `gaps` (and `stats.gaps`).

By default a publisher connects to a forwarder's XSUB side and a subscriber to its XPUB
side. A publisher that binds is *direct*: subscribers connect to it with no forwarder, and
it counts their subscriptions itself.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from .. import codec
from .._counters import Counters
from .._receive import AsyncInbox, Inbox, SyncInbox, _remaining_ms
from .._socket import (
    RECV,
    SEND,
    AnyContext,
    SocketOwner,
    recv_frames_first,
    recv_rest,
    send_frames,
)
from ..endpoint import EndpointArg, parse_many
from ..envelope import Envelope, IdSource
from ..errors import ConfigError, DecodeError, ReadyTimeout
from ..options import DEFAULT_FORWARDER_XPUB, DEFAULT_FORWARDER_XSUB, SocketOptions

_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RAW = frozenset({bytes, bytearray, memoryview})
_INLINE = codec.INLINE_MAX
_decode_message = codec.decode_message
_DRAIN_EVERY = 256
"""A publisher reads its subscription traffic at least once per this many publishes."""
_CONTROL_SLICE_MS = 100
"""An asyncio publisher waiting for subscribers looks at its counts at least this often."""
_MAX_TRACKED = 100_000
"""Sequence trackers a subscriber keeps (publisher x topic) before forgetting the oldest."""


class _PublisherBase(SocketOwner):
    """The no-I/O half of a publisher: sequence numbers, frames, subscription bookkeeping."""

    _socket_type = zmq.XPUB
    _hand_over = True

    def __init__(
        self,
        endpoints: EndpointArg = DEFAULT_FORWARDER_XSUB,
        *,
        bind: bool | None = None,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        eps = parse_many(endpoints, bind=bind, default_bind=False)
        self.direct = any(ep.bind for ep in eps)
        super().__init__(eps, options=options, context=context, tune={zmq.XPUB_VERBOSER: 1} if self.direct else None)
        self.stats = Counters()
        self._ids = IdSource()
        self._topics: dict[str, list[Any]] = {}
        self._raw_subs: dict[bytes, int] = {}
        self._counted: dict[bytes, int] = {}
        self._until_drain = _DRAIN_EVERY

    @property
    def origin(self) -> bytes:
        """This publisher's 8-byte identity; subscribers group sequence numbers by it."""
        return self._ids.origin

    def _frames(self, topic: str, body: Any, headers: Mapping[str, Any] | None) -> tuple[Envelope, list[Any]]:
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = [codec.validate_topic(topic), 0, codec.Stamp(self._ids, topic)]
        if headers is None and codec.is_plain(body):
            env, message = entry[2].plain(body, time.time(), entry[1] + 1)
            frames = [entry[0], message]
        else:
            env, more = entry[2].encode(body, time.time(), None, headers, entry[1] + 1)
            frames = [entry[0], *more]
        entry[1] += 1  # only once encoded: a body that cannot be must not leave a gap in the sequence
        return env, frames

    def _on_control(self, msg: bytes) -> bytes | None:
        """Apply one subscription message; returns a probe answer to publish, if any."""
        if not msg or msg[0] not in (0, 1):
            return None
        subscribe, topic = msg[0] == 1, msg[1:]
        if topic.startswith(codec.COUNT_PREFIX):
            parsed = codec.parse_count_entry(topic)
            if parsed is not None:
                prefix, n = parsed
                if subscribe:
                    self._counted[prefix] = n
                elif self._counted.get(prefix) == n:
                    del self._counted[prefix]
            return None
        if topic.startswith(codec.PROBE_PREFIX):
            return topic if subscribe and self.direct else None
        if self.direct:
            n = self._raw_subs.get(topic, 0) + (1 if subscribe else -1)
            if n > 0:
                self._raw_subs[topic] = n
            else:
                self._raw_subs.pop(topic, None)
        return None

    def subscribers(self, topic: str = "") -> int:
        """Subscriptions whose prefix matches `topic`, as last heard (call after a drain)."""
        data = topic.encode()
        table = self._raw_subs if self.direct else self._counted
        return sum(n for prefix, n in table.items() if data.startswith(prefix))


class Publisher(_PublisherBase):
    """Publishes messages on topics; each carries a sequence number per (publisher, topic)."""

    def publish(self, topic: str, body: Any, *, headers: Mapping[str, Any] | None = None) -> Envelope:
        """Publish one message; never blocks (a full high-water mark drops, and subscribers count it)."""
        if self._closed:
            self._check_open()
        entry = self._topics.get(topic)
        if entry is not None and headers is None and (type(body) not in _RAW or
                                                      type(body) is bytes and len(body) < _INLINE):
            # _frames' plain case, and send_frames of its two frames, inlined: the hottest path
            env, message = entry[2].plain(body, time.time(), entry[1] + 1)
            entry[1] += 1  # only once encoded: a body that cannot be must not leave a gap in the sequence
            sock = self._sock
            SEND(sock, entry[0], _SNDMORE)
            SEND(sock, message, 0)
        else:
            env, frames = self._frames(topic, body, headers)
            send_frames(self._sock, frames)
        self.stats.sent += 1
        self._until_drain -= 1
        if not self._until_drain:
            self.poll_control()
        return env

    def poll_control(self) -> None:
        """Read pending subscription traffic (counts, probes) without blocking."""
        self._until_drain = _DRAIN_EVERY
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            answer = self._on_control(msg)
            if answer is not None:
                self._sock.send(answer)

    def wait_for_subscribers(self, count: int = 1, topic: str = "", timeout: float = 10.0) -> int:
        """Block until at least `count` subscriptions match `topic`; returns how many do."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            self.poll_control()
            n = self.subscribers(topic)
            if n >= count:
                return n
            if not self._sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                raise ReadyTimeout(f"{n} of {count} subscriber(s) for topic {topic!r} after {timeout:g} s")


class AsyncPublisher(_PublisherBase):
    """The asyncio face of Publisher."""

    _asyncio = True

    async def publish(self, topic: str, body: Any, *, headers: Mapping[str, Any] | None = None) -> Envelope:
        """Publish one message; never waits on a slow subscriber."""
        self._check_open()
        env, frames = self._frames(topic, body, headers)
        send_frames(self._sync_sock, frames)  # a PUB never blocks (it drops for a subscriber at its HWM)
        self.stats.sent += 1
        self._until_drain -= 1
        if not self._until_drain:
            await self.poll_control()
        return env

    async def poll_control(self) -> None:
        """Read pending subscription traffic (counts, probes) without waiting."""
        self._until_drain = _DRAIN_EVERY
        while True:
            try:
                msg = RECV(self._sync_sock, _NOBLOCK)
            except zmq.Again:
                return
            answer = self._on_control(msg)
            if answer is not None:
                await self._asend([answer])

    async def wait_for_subscribers(self, count: int = 1, topic: str = "", timeout: float = 10.0) -> int:
        """Wait until at least `count` subscriptions match `topic`; returns how many do."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            await self.poll_control()
            n = self.subscribers(topic)
            if n >= count:
                return n
            left = _remaining_ms(deadline)
            if not left:
                raise ReadyTimeout(f"{n} of {count} subscriber(s) for topic {topic!r} after {timeout:g} s")
            # In slices: a publish in another task may read the subscription (and the socket's signal) first.
            await self._sock.poll(min(left, _CONTROL_SLICE_MS), zmq.POLLIN)


@dataclass
class SubscriberCounters(Counters):
    """Subscriber counters: `gaps` is how many messages were published to us but never arrived."""

    gaps: int = 0


class _SubscriberBase(Inbox):
    """The no-I/O half of a subscriber: subscriptions, probes, gap counting."""

    _socket_type = zmq.SUB
    _sends_data = False
    _decode = staticmethod(codec.decode_published)
    stats: SubscriberCounters
    _pending: deque[Envelope]

    def __init__(
        self,
        endpoints: EndpointArg = DEFAULT_FORWARDER_XPUB,
        *,
        topics: str | Sequence[str] = (),
        bind: bool | None = None,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        super().__init__(parse_many(endpoints, bind=bind, default_bind=False), options=options, context=context)
        self.stats = SubscriberCounters()
        self.topics: list[str] = []
        self._last_seq: dict[tuple[bytes, str], int] = {}
        self._probes_seen: set[bytes] = set()
        self._pending = deque()
        for topic in [topics] if isinstance(topics, str) else topics:
            self.subscribe(topic)

    @property
    def gaps(self) -> int:
        """Messages missed so far: sequence numbers skipped by any publisher on any topic."""
        return self.stats.gaps

    def subscribe(self, topic: str) -> None:
        """Receive every message whose topic starts with `topic` ("" means everything)."""
        self._check_open()
        self._sock.setsockopt(zmq.SUBSCRIBE, codec.validate_topic(topic))
        self.topics.append(topic)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving `topic` (one earlier subscribe of it)."""
        self._check_open()
        if topic not in self.topics:
            raise ConfigError(f"not subscribed to {topic!r} (subscribed: {self.topics})")
        self._sock.setsockopt(zmq.UNSUBSCRIBE, codec.validate_topic(topic))
        self.topics.remove(topic)

    def _accept(self, frames: list[bytes], first: zmq.Frame | None = None) -> Envelope | None:
        if frames[0][:1] == codec.CONTROL_PREFIX:
            if frames[0].startswith(codec.PROBE_PREFIX):
                self._probes_seen.add(frames[0])
            return None
        return super()._accept(frames, first)

    _plain = False

    def _take(self, sock: zmq.Socket[Any], first: zmq.Frame) -> Envelope | None:
        """`Inbox._take` for `[topic, message]`, the commonest published message: decoded from the received
        frame in place, without a list of copies; anything else goes the general way."""
        if not first.more:  # a probe answer, or foreign bytes
            return self._accept([first.bytes], first)
        second = RECV(sock, 0, False)
        topic = first.bytes
        if second.more or topic[:1] == codec.CONTROL_PREFIX:
            return self._accept([topic, *recv_rest(sock, second)], first)
        try:
            env = _decode_message(second)
            if env.topic.encode() != topic:
                raise DecodeError("topic frame does not match the header's topic")
        except DecodeError as exc:
            self._refuse(DecodeError(exc.reason, [topic, second]), first)
            return None
        self.stats.received += 1
        return self._after_accept(env)

    def _after_accept(self, env: Envelope) -> Envelope:
        seq = env.seq
        if seq is not None:
            key = (env.id[:8], env.topic)
            last = self._last_seq.get(key)
            if last is not None and seq > last + 1:
                self.stats.gaps += seq - last - 1
            elif last is None and len(self._last_seq) >= _MAX_TRACKED:
                del self._last_seq[next(iter(self._last_seq))]
            self._last_seq[key] = seq
        return env

    def _start_probe(self) -> bytes:
        probe = codec.PROBE_PREFIX + os.urandom(8).hex().encode()
        self._sock.setsockopt(zmq.SUBSCRIBE, probe)
        return probe

    def _end_probe(self, probe: bytes) -> None:
        self._probes_seen.discard(probe)
        if not self._closed:
            self._sock.setsockopt(zmq.UNSUBSCRIBE, probe)


class Subscriber(_SubscriberBase, SyncInbox):
    """Receives published messages: `receive(timeout)` or `for env in subscriber`."""

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the forwarder (or a direct publisher) has every subscription made so far.

        Messages that arrive meanwhile are kept and returned by the next receive() calls.
        """
        self._check_open()
        probe = self._start_probe()
        deadline = time.monotonic() + timeout
        try:
            while probe not in self._probes_seen:
                if not self._sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                    raise ReadyTimeout(f"subscriptions not confirmed within {timeout:g} s by {self.endpoint}")
                env = self._accept(*recv_frames_first(self._sock, zmq.NOBLOCK))
                if env is not None:
                    self._pending.append(env)
        finally:
            self._end_probe(probe)


class AsyncSubscriber(_SubscriberBase, AsyncInbox):
    """The asyncio face of Subscriber: `await receive(timeout)` or `async for env in subscriber`."""

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the forwarder (or a direct publisher) has every subscription made so far."""
        self._check_open()
        probe = self._start_probe()
        deadline = time.monotonic() + timeout
        try:
            while probe not in self._probes_seen:
                if not await self._sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                    raise ReadyTimeout(f"subscriptions not confirmed within {timeout:g} s by {self.endpoint}")
                raw = await self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                env = self._accept([f.bytes for f in raw], raw[0])
                if env is not None:
                    self._pending.append(env)
        finally:
            self._end_probe(probe)
