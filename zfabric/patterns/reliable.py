"""Reliable producers: send to a queue's sidecar and return only once it has durably stored the message.

A message that gets no confirm within `resend_after` is sent again with the same id (the
sidecar drops the duplicate and confirms again); one still unconfirmed after `timeout`
is reported in `Unconfirmed`, never silently lost. `ConfirmFlow` is the no-I/O
bookkeeping both faces drive.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from .. import codec
from .._counters import Counters
from .._logs import Throttled
from .._receive import log
from .._socket import (
    AnyContext,
    SocketOwner,
    readable,
    send_frames,
    waiting,
)
from ..endpoint import EndpointArg, parse_many
from ..envelope import Envelope, IdSource, Kind
from ..errors import ConfigError, DecodeError, Rejected, Unconfirmed
from ..options import UNSET, SocketOptions, Unset
from ..sidecar import protocol as p

_bad = Throttled(log)


@dataclass
class ReliableCounters(Counters):
    """`sent` counts first sends; resends, confirms, rejections and give-ups are counted apart."""

    resent: int = 0
    confirmed: int = 0
    rejected: int = 0
    unconfirmed: int = 0


@dataclass(slots=True, eq=False)
class _Pending:
    env: Envelope
    frames: list[Any]
    timeout: float
    first_sent: float = 0.0
    last_sent: float = 0.0


class ConfirmFlow:
    """Which messages await a confirm, which are due for a resend, which ran out of time. No I/O, no clock."""

    def __init__(self, resend_after: float) -> None:
        self.resend_after = resend_after
        self.pending: dict[bytes, _Pending] = {}
        self.unsent: deque[bytes] = deque()
        self._next_scan = 0.0
        self._last_batch: list[bytes] = []

    def add(self, env: Envelope, frames: list[Any], timeout: float) -> None:
        self.pending[env.id] = _Pending(env, frames, timeout)
        self.unsent.append(env.id)

    def batch(self, now: float, limit: int) -> tuple[list[Any], int, int]:
        """(PUT frames, first sends, resends) for up to `limit` unsent messages (and about p.BATCH_BYTES);
        empty frames when none."""
        items: list[Any] = []
        size = 0
        first = again = 0
        self._last_batch.clear()
        while self.unsent and first + again < limit and size < p.BATCH_BYTES:
            key = self.unsent.popleft()
            item = self.pending.get(key)
            if item is None:
                continue  # confirmed while it waited for a resend
            if item.last_sent:
                again += 1
            else:
                first += 1
            if not item.first_sent:
                item.first_sent = now  # its timeout runs from the first try, sent or not
            item.last_sent = now
            items += item.frames
            size += len(item.frames[0]) + len(item.frames[1])
            self._last_batch.append(key)
        return ([p.PUT, p.pack(items)] if items else []), first, again

    def unsend_last(self) -> None:
        """The last batch could not be sent (no sidecar connection yet): put it back first in line, as never sent."""
        for key in reversed(self._last_batch):
            item = self.pending.get(key)
            if item is not None:
                item.last_sent = 0.0
                self.unsent.appendleft(key)
        self._last_batch.clear()

    def confirm(self, ids: Iterable[bytes]) -> list[Envelope]:
        """The envelopes these ids confirm (ids not pending, e.g. repeated confirms, are ignored)."""
        out = []
        for i in ids:
            item = self.pending.pop(i, None)
            if item is not None:
                out.append(item.env)
        return out

    def reject(self, items: Iterable[tuple[bytes, str]]) -> list[tuple[Envelope, str]]:
        out = []
        for i, reason in items:
            item = self.pending.pop(i, None)
            if item is not None:
                out.append((item.env, reason))
        return out

    def due(self, now: float) -> list[Envelope]:
        """Queue resends for messages unconfirmed past `resend_after`; returns those past their timeout (removed)."""
        if now < self._next_scan:
            return []
        self._next_scan = now + self.resend_after / 4
        overdue: list[Envelope] = []
        queued = set(self.unsent)
        for key, item in list(self.pending.items()):
            if not item.first_sent:
                continue
            if now - item.first_sent >= item.timeout:
                del self.pending[key]
                overdue.append(item.env)
            elif now - item.last_sent >= self.resend_after and key not in queued:
                self.unsent.append(key)
        return overdue

    def wait(self, now: float) -> float:
        """Seconds until something here is due."""
        return max(min(self.resend_after / 4, self._next_scan - now), 0.001) if self.pending else self.resend_after


def parse_reply(frames: list[bytes]) -> tuple[list[bytes], list[tuple[bytes, str]]]:
    """(confirmed ids, [(rejected id, reason)]) from one sidecar reply; DecodeError for anything else."""
    if len(frames) == 2 and frames[0] == p.CONFIRM:
        ids = p.unpack(frames[1], "OK")
        if type(ids) is list and all(type(i) is bytes for i in ids):
            return ids, []
    elif len(frames) == 2 and frames[0] == p.REJECT:
        items = p.unpack(frames[1], "REJ")
        if type(items) is list and all(type(i) is list and len(i) == 2 and type(i[0]) is bytes for i in items):
            return [], [(i[0], str(i[1])) for i in items]
    raise DecodeError("not a sidecar confirm or reject", frames)


def _unique(envs: Iterable[Envelope]) -> list[Envelope]:
    """The envelopes once each, by id, in order (one id is one message, however often it is passed)."""
    seen: dict[bytes, Envelope] = {}
    for env in envs:
        seen.setdefault(env.id, env)
    return list(seen.values())


class _ReliableBase(SocketOwner):
    _socket_type = zmq.DEALER
    _tune = {zmq.IMMEDIATE: 1}

    def __init__(
        self,
        endpoints: EndpointArg,
        queue: str,
        *,
        timeout: float = 10.0,
        resend_after: float = 1.0,
        max_in_flight: int = 1000,
        batch_size: int = 100,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        if not queue or not isinstance(queue, str):
            raise ConfigError("ReliableProducer: queue must be a non-empty string (the queue the sidecar serves)")
        if timeout <= 0 or resend_after <= 0 or max_in_flight < 1 or batch_size < 1:
            raise ConfigError("ReliableProducer: timeout, resend_after, max_in_flight and batch_size must be positive")
        super().__init__(parse_many(endpoints, bind=False, default_bind=False), options=options, context=context)
        self.queue = queue
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.stats = ReliableCounters()
        self._flow = ConfirmFlow(resend_after)
        self._ids = IdSource()
        self._stamp = codec.Stamp(self._ids, queue)
        self._blocked = False
        """The last flush would have blocked (no sidecar connection): wait for writability, not only replies."""

    def envelope(self, body: Any, *, headers: Mapping[str, Any] | None = None, ttl: float | None = None) -> Envelope:
        """A new envelope for this queue (ttl: seconds until the sidecar dead-letters it as expired)."""
        now = time.time()
        return Envelope(self._ids.next(), Kind.MESSAGE, self.queue, body, None, None, 1, now,
                        None if ttl is None else now + ttl, headers if headers is not None else {}, None)

    def _stamped(self, bodies: Iterable[Any], headers: Mapping[str, Any] | None,
                 ttl: float | None) -> list[tuple[Envelope, list[Any]]]:
        """(envelope, [header, body]) for each body, all encoded before anything is sent: a body msgpack
        cannot encode raises EncodeError with nothing of the call sent."""
        encode = self._stamp.encode
        now = time.time()
        deadline = None if ttl is None else now + ttl
        return [encode(body, now, deadline, headers, None, True) for body in bodies]

    def _prepared(self, envs: Iterable[Envelope]) -> list[tuple[Envelope, list[Any]]]:
        """Ready-made envelopes, once each by id, with their frames (checked before anything is sent)."""
        return [(env, self._check_queue(env)) for env in _unique(envs)]

    def _timeout(self, timeout: float | Unset) -> float:
        return self.timeout if timeout is UNSET else float(timeout)  # type: ignore[arg-type]

    def _check_queue(self, env: Envelope) -> list[Any]:
        if env.topic != self.queue:
            raise ConfigError(f"envelope {env.id_hex} is for queue {env.topic!r}; this producer sends to {self.queue!r}")
        return codec.encode_split(env)  # the sidecar stores header and body apart

    def _replies(self, frames: list[bytes]) -> tuple[list[Envelope], list[tuple[Envelope, str]]]:
        try:
            ids, rejected = parse_reply(frames)
        except DecodeError as exc:
            self.stats.decode_errors += 1
            _bad.warning(self._who, "%s: %s", self._who, exc)
            return [], []
        done = self._flow.confirm(ids)
        refused = self._flow.reject(rejected)
        self.stats.confirmed += len(done)
        self.stats.rejected += len(refused)
        return done, refused

    def _flush_to(self, sock: zmq.Socket[Any]) -> bool:
        """Send every message waiting to go out (first sends and due resends), in PUT batches.

        Returns True when the socket would block (no sidecar connection yet): the caller then
        waits until it is writable, so a first send goes out as soon as the connection is up.
        """
        now = time.monotonic()
        while self._flow.unsent:
            frames, first, again = self._flow.batch(now, self.batch_size)
            if not frames:
                break
            try:
                send_frames(sock, frames, zmq.NOBLOCK)
            except zmq.Again:
                self._flow.unsend_last()
                self._blocked = True
                return True
            self.stats.sent += first
            self.stats.resent += again
        self._blocked = False
        return False

    def _wait_events(self, blocked: bool) -> int:
        return zmq.POLLIN | zmq.POLLOUT if blocked else zmq.POLLIN

    def _outcome(self, envs: list[Envelope], confirmed: list[Envelope], rejected: list[tuple[Envelope, str]],
                 overdue: list[Envelope], timeout: float) -> list[Envelope]:
        if overdue:
            done = {e.id for e in confirmed}
            lost = [e for e in envs if e.id not in done and all(e.id != r[0].id for r in rejected)]
            self.stats.unconfirmed += len(lost)
            raise Unconfirmed(f"{len(lost)} of {len(envs)} message(s) not confirmed by the sidecar at "
                              f"{self.endpoint} within {timeout:g} s; resend them (same ids) when it is back",
                              confirmed=confirmed, unconfirmed=lost)
        if rejected:
            env, reason = rejected[0]
            raise Rejected(f"sidecar at {self.endpoint} refused {len(rejected)} message(s): {reason}",
                           message_id=env.id, reason=reason)
        return envs


class ReliableProducer(_ReliableBase):
    """Sends to a reliable queue; each call returns once the sidecar confirms the messages are stored.

    Example:  ReliableProducer("tcp://127.0.0.1:5580", "orders").send({"order": 1})
    """

    def send(self, body: Any, *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
             timeout: float | Unset = UNSET) -> Envelope:
        """Send one message and wait for its confirm; raises Unconfirmed after `timeout` s."""
        return self._send(self._stamped([body], headers, ttl), timeout, None)[0]

    def send_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
                  timeout: float | Unset = UNSET, on_confirm: Callable[[Envelope], None] | None = None) -> list[Envelope]:
        """Send many messages, pipelined and batched; returns once all are confirmed.

        `on_confirm` is called for each message as its confirm arrives. Raises Unconfirmed
        (with `confirmed` and `unconfirmed`) if some are not confirmed in time.
        """
        return self._send(self._stamped(bodies, headers, ttl), timeout, on_confirm)

    def send_envelopes(self, envs: Iterable[Envelope], *, timeout: float | Unset = UNSET,
                       on_confirm: Callable[[Envelope], None] | None = None) -> list[Envelope]:
        """Send ready-made envelopes with their ids (e.g. the `unconfirmed` of an earlier Unconfirmed)."""
        return self._send(self._prepared(envs), timeout, on_confirm)

    def _send(self, prepared: list[tuple[Envelope, list[Any]]], timeout: float | Unset,
              on_confirm: Callable[[Envelope], None] | None) -> list[Envelope]:
        self._check_open()
        limit = self._timeout(timeout)
        flow, sock = self._flow, self._sock
        flow.pending.clear()
        flow.unsent.clear()
        confirmed: list[Envelope] = []
        rejected: list[tuple[Envelope, str]] = []
        overdue: list[Envelope] = []
        todo = iter(prepared)
        while not overdue:
            while len(flow.pending) < self.max_in_flight:
                item = next(todo, None)
                if item is None:
                    break
                flow.add(item[0], item[1], limit)
            if not flow.pending:
                break
            blocked = self._flush_to(sock)
            wait_ms = int(flow.wait(time.monotonic()) * 1000) + 1
            if readable(sock, wait_ms) if not blocked else sock.poll(wait_ms, self._wait_events(True)):
                for frames in waiting(sock):
                    done, refused = self._replies(frames)
                    confirmed += done
                    rejected += refused
                    if on_confirm is not None:
                        for env in done:
                            on_confirm(env)
            overdue = flow.due(time.monotonic())
        return self._outcome([env for env, _ in prepared], confirmed, rejected, overdue, limit)


class AsyncReliableProducer(_ReliableBase):
    """The asyncio face: `await send(...)` returns once stored; many coroutines may send at once and share batches."""

    _asyncio = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiters: dict[bytes, asyncio.Future[Envelope]] = {}
        self._pump_task: asyncio.Task[None] | None = None
        self._slots: asyncio.Semaphore | None = None

    async def send(self, body: Any, *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
                   timeout: float | Unset = UNSET) -> Envelope:
        """Send one message and wait for its confirm; raises Unconfirmed after `timeout` s."""
        return (await self._send(self._stamped([body], headers, ttl), timeout, None))[0]

    async def send_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None, ttl: float | None = None,
                        timeout: float | Unset = UNSET, on_confirm: Callable[[Envelope], None] | None = None) -> list[Envelope]:
        """Send many messages, pipelined and batched; returns once all are confirmed (see ReliableProducer.send_many)."""
        return await self._send(self._stamped(bodies, headers, ttl), timeout, on_confirm)

    async def send_envelopes(self, envs: Iterable[Envelope], *, timeout: float | Unset = UNSET,
                             on_confirm: Callable[[Envelope], None] | None = None) -> list[Envelope]:
        """Send ready-made envelopes with their ids and wait for every confirm."""
        return await self._send(self._prepared(envs), timeout, on_confirm)

    async def _send(self, prepared: list[tuple[Envelope, list[Any]]], timeout: float | Unset,
                    on_confirm: Callable[[Envelope], None] | None) -> list[Envelope]:
        self._check_open()
        limit = self._timeout(timeout)
        envs = [env for env, _ in prepared]
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = loop.create_task(self._pump())
        futures = []
        for env, frames in prepared:
            pending = self._waiters.get(env.id)
            if pending is not None:  # already on its way for another coroutine: share its confirm
                futures.append(pending)
                continue
            await self._slots.acquire()
            fut: asyncio.Future[Envelope] = loop.create_future()
            fut.add_done_callback(self._settled(on_confirm))
            self._waiters[env.id] = fut
            self._flow.add(env, frames, limit)
            futures.append(fut)
            if len(self._flow.unsent) >= self.batch_size:
                self._flush_to(self._sync_sock)
        self._flush_to(self._sync_sock)
        results = await asyncio.gather(*futures, return_exceptions=True)
        confirmed = [r for r in results if isinstance(r, Envelope)]
        rejected = [(e, str(r.reason)) for e, r in zip(envs, results) if isinstance(r, Rejected)]
        overdue = [e for e, r in zip(envs, results) if isinstance(r, Unconfirmed)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, (Rejected, Unconfirmed)):
                raise r
        return self._outcome(envs, confirmed, rejected, overdue, limit)

    def _settled(self, on_confirm: Callable[[Envelope], None] | None) -> Callable[[asyncio.Future[Envelope]], None]:
        def done(fut: asyncio.Future[Envelope]) -> None:
            assert self._slots is not None
            self._slots.release()
            if on_confirm is not None and not fut.cancelled() and fut.exception() is None:
                on_confirm(fut.result())
        return done

    async def _pump(self) -> None:
        flow, sock = self._flow, self._sock
        while not self._closed:
            if await sock.poll(int(flow.wait(time.monotonic()) * 1000) + 1, self._wait_events(self._blocked)):
                for frames in waiting(self._sync_sock):
                    done, refused = self._replies(frames)
                    for env in done:
                        fut = self._waiters.pop(env.id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(env)
                    for env, reason in refused:
                        fut = self._waiters.pop(env.id, None)
                        if fut is not None and not fut.done():
                            fut.set_exception(Rejected(reason, message_id=env.id, reason=reason))
            for env in flow.due(time.monotonic()):
                fut = self._waiters.pop(env.id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(Unconfirmed("not confirmed in time", unconfirmed=[env]))
            self._flush_to(self._sync_sock)

    def _close_sockets(self, linger_ms: int) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        super()._close_sockets(linger_ms)
