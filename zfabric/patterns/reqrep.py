"""Request-reply (DEALER <-> ROUTER): one request, one correlated reply.

A `Replier` binds a ROUTER and runs a handler per request; what the handler returns goes
back as the reply, and what it raises goes back as a RemoteError with the exception's type
and message. A `Requester` connects a DEALER to one or more repliers (round-robin), keeps
many requests in flight, and matches replies by correlation id, so no reply ever reaches
the wrong caller. Each attempt has a timeout; a timed-out request is retried on a fresh
socket (Lazy Pirate) up to `retries` times, then fails with RequestTimeout. Retries mean
a handler may run more than once for one request: make handlers idempotent, or use
`retries=0`. A replier also accepts REQ clients (an empty delimiter frame is echoed back).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack
import zmq

from .. import codec
from .._counters import Counters
from .._logs import Throttled
from .._receive import count_bad, decode_counted
from .._socket import (
    RECV,
    SEND,
    ZERO_COPY_MIN,
    AnyContext,
    SocketOwner,
    next_frames,
    open_socket,
    rearm,
    recv_frames,
    recv_frames_first,
    recv_frames_with_user,
    recv_rest,
    send_frames,
    send_routed,
    user_of,
    wait_ms,
    waiting,
)
from ..endpoint import Endpoint, EndpointArg, parse_many
from ..envelope import Envelope, IdSource, Kind
from ..errors import ClosedError, ConfigError, DecodeError, EncodeError, FabricError
from ..options import (
    DEFAULT_REQUEST_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
    UNSET,
    SocketOptions,
    Unset,
)
from ..security.permissions import Permissions
from ._flows import RequestCounters, RequestFlow

log = logging.getLogger("zfabric.reqrep")

Handler = Callable[[Envelope], Any]
"""A replier handler: takes the request envelope, returns the reply body (or an awaitable of it)."""


def error_body(exc: BaseException) -> dict[str, str]:
    """How an exception travels in an ERROR reply: type, message, short traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=5))
    return {"type": type(exc).__qualname__, "message": str(exc), "traceback": tb[-2000:]}


# ---- replier ---------------------------------------------------------------------------


BATCH_REPLY_AFTER = 0.002
"""A replier answering a batch of requests sends the replies gathered so far once this many seconds passed."""
BATCH_MAX = 100
"""Requests per ZeroMQ message at most when `request_many` batches them."""
BATCH_BYTES = 1 << 20
"""A batch being built is sent once its encoded requests reach this many bytes."""
_NOBLOCK = int(zmq.NOBLOCK)
REPLY_GRACE = 0.1
"""Seconds a replier closing just after a reply keeps its connections, so that its requesters read it first."""
TAKES_BATCHES = b"zfb1"
"""How a requester's routing id starts when it accepts batches of replies to its single requests (every
zfabric Requester): a replier then answers several of its requests that were waiting together in one
message. A requester without it (a REQ socket, a foreign client) gets one reply per message."""
GATHER_MAX = 64
"""Messages a replier takes at once from those already waiting, so as to answer them in batches."""
GATHER_ALONE = 16 * 1024
"""A reply this large (bytes, encoded) goes alone, not copied into a batch."""
IDLE_SKIP = 7
"""After finding nothing waiting, a replier looks again only after this many requests: looking costs about
2 us (a failed receive), which one request at a time would pay for nothing."""


def batch_taking_id() -> bytes:
    """A fresh routing id for a requester socket that accepts batches of replies (TAKES_BATCHES)."""
    return TAKES_BATCHES + os.urandom(12)


_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_decode_message = codec.decode_message
_REQUEST = Kind.REQUEST
_REPLY = Kind.REPLY
_NOT_A_REPLY = codec.NOT_A_REPLY


@dataclass
class ReplierCounters(Counters):
    """What a replier has done: `errors` are handler exceptions sent back as RemoteError."""

    requests: int = 0
    replies: int = 0
    errors: int = 0
    expired: int = 0
    invalid: int = 0
    undeliverable: int = 0
    denied: int = 0
    """Requests dropped because their key may not use this service."""
    reply_batches: int = 0
    """Messages that carried several replies (to a batch of requests, or to requests that waited together)."""


class _ReplierBase(SocketOwner):
    """The no-I/O half of a replier: parse a request, build the reply frames."""

    _socket_type = zmq.ROUTER
    _tune = {zmq.ROUTER_MANDATORY: 1}

    def __init__(
        self,
        endpoints: EndpointArg,
        handler: Handler,
        *,
        bind: bool | None = None,
        name: str = "",
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
        permissions: Permissions | None = None,
    ) -> None:
        super().__init__(parse_many(endpoints, bind=bind, default_bind=True), options=options, context=context)
        if permissions is not None and (self.options.curve is None or not name):
            raise ConfigError("replier permissions need CURVE (a key identifies each client) and a name (the service "
                              "the rules grant)")
        self.handler = handler
        self.name = name
        self.permissions = permissions
        """Which keys may use this service (`name`); None: every key the allowlist lets in."""
        self.stats = ReplierCounters()
        self._ids = IdSource()
        self._pack = msgpack.Packer().pack
        self._bad_log = Throttled(log)
        self._stop = threading.Event()

    def _plain_request(self, payload: bytes) -> Envelope | None:
        """The request in a one-frame `payload` when it is one valid request, the commonest message (counted);
        None for anything else, which `_parse` then counts and logs (it decodes it again: only bad input pays)."""
        try:
            request = _decode_message(payload)
        except DecodeError:
            return None
        if request.kind is not _REQUEST:
            return None
        stats = self.stats
        stats.received += 1
        stats.requests += 1
        return request

    def _parse(self, frames: list[bytes], who: str | None = None) -> tuple[list[bytes], list[Envelope]] | None:
        """(routing prefix, requests) for a valid request, or batch of them, that a permitted key sent;
        None (counted) when nothing in it is one."""
        if len(frames) == 2:  # [id, message] from a DEALER, the commonest: one request, decoded directly
            route, payload = frames[:1], frames[1:]
            try:
                envs = [codec.decode_message(frames[1], payload)]
            except DecodeError as exc:
                count_bad(exc, self.stats, self._who)
                return None
            self.stats.received += 1
        else:
            if len(frames) >= 3 and frames[1] == b"":  # from a REQ socket: [id, "", message...]
                route, payload = frames[:2], frames[2:]
            else:
                route, payload = frames[:1], frames[1:]
            envs = decode_counted(payload, self.stats, self._who, codec.decode_many)
            if envs is None:
                return None
            self.stats.received += len(envs) - 1
        if self.permissions is not None and not self.permissions.may_use_service(who, self.name):
            self.stats.denied += len(envs)
            self._bad_log.warning(f"denied|{who}", "replier %s: key %s may not use service %r; request dropped",
                                  self.endpoint, who, self.name)
            return None
        requests = envs if len(envs) == 1 and envs[0].kind is Kind.REQUEST else [e for e in envs if e.kind is Kind.REQUEST]
        if len(requests) < len(envs):
            self.stats.invalid += len(envs) - len(requests)
            kind = next(env.kind for env in envs if env.kind is not Kind.REQUEST)
            self._bad_log.warning("kind", "replier %s: ignored a %s envelope (expected a request)", self.endpoint, kind.name)
        if not requests:
            return None
        self.stats.requests += len(requests)
        return route, requests

    def _wanted(self, request: Envelope) -> bool:
        """False (and counted) when the requester's deadline passed before the handler could run."""
        if request.expired():
            self.stats.expired += 1
            return False
        return True

    def _reply(self, route: list[bytes], request: Envelope, result: Any = None, exc: BaseException | None = None,
               split_at: float = codec.INLINE_MAX) -> list[Any]:
        """The frames that answer `request` with `result` or with the exception `exc`
        (`split_at=math.inf`: always one frame, as a batch entry must be)."""
        frames = self._encode_answer(request, result, exc, split_at)
        return [*route, *frames] if route else frames

    def _encode_answer(self, request: Envelope, result: Any, exc: BaseException | None, split_at: float) -> list[Any]:
        """`_reply` without a route: a reply's frames, packed by this replier's own Packer (replies run on one
        thread or loop); an error reply when `exc` is set or `result` cannot be encoded."""
        if exc is None:
            try:
                frames = codec.encode_answer(self._pack, Kind.REPLY, self._ids.next(), request, result, time.time(),
                                             split_at)
            except EncodeError as err:
                exc = err
            else:
                self.stats.replies += 1
                return frames
        self.stats.errors += 1
        return codec.encode_answer(self._pack, Kind.ERROR, self._ids.next(), request, error_body(exc), time.time(),
                                   split_at)

    def _undeliverable(self, exc: zmq.ZMQError) -> None:
        self.stats.undeliverable += 1
        why = "the replier was closed while its handler ran" if self._closed else "the requester is gone or full"
        self._bad_log.warning("undeliverable", "replier %s: reply not delivered (%s); %s", self.endpoint, exc.strerror, why)

    def stop(self) -> None:
        """Ask serve() to return (from any thread); it does within about 100 ms."""
        self._stop.set()

    _last_reply = -math.inf
    """When this replier last sent a reply (monotonic seconds)."""

    def _grace_left(self, linger_ms: int | None) -> float:
        """Seconds close() should still keep the connections open so that the last replies are read.

        A requester connects with ZMQ_IMMEDIATE, and libzmq then throws away what such a connection had
        received but the application had not read yet when the connection drops: a replier that closed right
        after answering lost every reply of a client that read them 30 ms later (the test). Keeping the
        connections REPLY_GRACE after the last reply (within the linger) gives the client that long to read."""
        linger = self.options.linger_ms if linger_ms is None else linger_ms
        return min(REPLY_GRACE, max(linger, 0) / 1000) - (time.monotonic() - self._last_reply)

    def close(self, linger_ms: int | None = None) -> None:
        """Close; a replier that answered within the last REPLY_GRACE seconds waits that long first (at most its
        linger), so that the requesters read those replies before the connections drop."""
        if not self._closed:
            wait = self._grace_left(linger_ms)
            if wait > 0:
                time.sleep(wait)
        super().close(linger_ms)


class Replier(_ReplierBase):
    """Serves requests with a handler, one at a time, in the thread that calls serve()."""

    def handle_one(self, frames: list[bytes], who: str | None = None) -> int:
        """Answer one received message (a request, or a batch of them) from key `who`, or count why not;
        returns how many requests it held.

        A batch is answered in batches: the replies gathered go out whenever BATCH_REPLY_AFTER
        has passed since the last went out, so a slow handler late in a batch does not hold
        back the answers before it.
        """
        if len(frames) == 2 and self.permissions is None and (request := self._plain_request(frames[1])) is not None:
            if self._wanted(request):  # the commonest message: one valid request, nobody's key to check
                self._send_reply(frames[:1], self._answer_frames(request, codec.INLINE_MAX), 1)
            return 1
        parsed = self._parse(frames, who)
        if parsed is None:
            return 0
        route, requests = parsed
        if len(requests) == 1:
            request = requests[0]
            if self._wanted(request):
                self._send_reply(route, self._answer_frames(request, codec.INLINE_MAX), 1)
            return 1
        answers: list[bytes] = []
        since = time.monotonic()
        for request in requests:
            if not self._wanted(request):
                continue
            answers += self._answer_frames(request, math.inf)
            now = time.monotonic()
            if now - since >= BATCH_REPLY_AFTER:
                self._send_answers(route, answers)
                answers, since = [], now
        if answers:
            self._send_answers(route, answers)
        return len(requests)

    def _answer_frames(self, request: Envelope, split_at: float) -> list[Any]:
        """The handler's answer to `request` as frames (without a route)."""
        try:
            result = self.handler(request)
        except Exception as exc:
            return self._encode_answer(request, None, exc, split_at)
        return self._encode_answer(request, result, None, split_at)

    def _send_answers(self, route: list[bytes], answers: list[bytes]) -> None:
        """One-frame replies to a batch: as a batch, or alone when only one is ready."""
        if len(answers) > 1:
            self.stats.reply_batches += 1
            self._send_reply(route, codec.join_batch(answers), len(answers))
        else:
            self._send_reply(route, answers, 1)

    def _send_reply(self, route: list[bytes], frames: list[Any], count: int) -> None:
        try:
            if len(route) == 1:  # [id, reply...], from a DEALER: the commonest
                send_routed(self._sock, route[0], frames, _NOBLOCK)
            else:
                send_frames(self._sock, [*route, *frames], _NOBLOCK)
            self.stats.sent += count
            self._last_reply = time.monotonic()
        except zmq.ZMQError as exc:
            self._undeliverable(exc)

    def answer_waiting(self, limit: int = GATHER_MAX, checked: bool = False) -> int:
        """Answer the messages already waiting (at most `limit`; `checked`: with their senders' key names), the
        replies to one requester that takes batches (TAKES_BATCHES) gathered into batches; how many messages
        were handled (0: none was waiting). Under load both sides then handle one ZeroMQ message for many replies."""
        receive = recv_frames_with_user if checked else recv_frames
        gathered: dict[bytes, list[bytes]] = {}
        since = time.monotonic()
        handled = 0
        for got in waiting(self._sock, limit, receive):
            frames, who = got if checked else (got, None)
            if len(frames) != 2 or not frames[0].startswith(TAKES_BATCHES):
                handled += self.handle_one(frames, who) or 1
                continue
            handled += 1
            request = None if checked else self._plain_request(frames[1])
            if request is None:  # what _parse says of it, counted and logged
                parsed = self._parse(frames, who)
                if parsed is None:
                    continue
                request = parsed[1][0]
            if not self._wanted(request):
                continue
            answer = self._answer_frames(request, codec.INLINE_MAX)
            if len(answer) > 1 or len(answer[0]) > GATHER_ALONE:
                self._send_reply(frames[:1], answer, 1)
            else:
                gathered.setdefault(frames[0], []).append(answer[0])
            if time.monotonic() - since >= BATCH_REPLY_AFTER:  # a slow handler holds back no reply for long
                self._send_gathered(gathered)
                since = time.monotonic()
        self._send_gathered(gathered)
        return handled

    def _send_gathered(self, gathered: dict[bytes, list[bytes]]) -> None:
        for route, answers in gathered.items():
            self._send_answers([route], answers)
        gathered.clear()

    def serve(self, *, max_requests: int | None = None) -> None:
        """Handle requests until stop() (or `max_requests` handled)."""
        self._check_open()
        sock = self._sock
        handled = 0
        checked = self.permissions is not None
        # A blocking receive with a timeout wakes up faster than poll-then-receive, and
        # the timeout lets stop() be noticed within 100 ms.
        sock.setsockopt(zmq.RCVTIMEO, 100)
        skip = 0
        try:
            while not self._stop.is_set() and (max_requests is None or handled < max_requests):
                try:
                    frames, who = recv_frames_with_user(sock) if checked else (recv_frames(sock), None)
                except zmq.Again:
                    continue
                handled += self.handle_one(frames, who) or 1  # at once: a lone request never waits for others
                if skip or self._stop.is_set():  # stopped: close() may have closed the socket under the handler
                    skip = max(0, skip - 1)
                    continue
                limit = GATHER_MAX if max_requests is None else min(GATHER_MAX, max_requests - handled)
                if limit > 0:
                    took = self.answer_waiting(limit, checked)
                    handled += took
                    skip = 0 if took else IDLE_SKIP
        finally:
            if not sock.closed:  # close() gives a running handler 5 s, then closes the socket under it
                sock.setsockopt(zmq.RCVTIMEO, -1)

    def start(self) -> Replier:
        """Serve in a daemon thread; the socket is handed to that thread and used only there."""
        self._thread = threading.Thread(target=self.serve, name=f"zfabric-replier-{self.endpoint}", daemon=True)
        self._thread.start()
        return self

    def close(self, linger_ms: int | None = None) -> None:
        """Stop serving (joining the thread start() made) and close."""
        self.stop()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        super().close(linger_ms)


class AsyncReplier(_ReplierBase):
    """Serves requests on the event loop; up to `concurrency` handlers run at once.

    A coroutine-function handler is awaited on the loop; a plain function runs in the
    loop's default thread pool, so a slow or blocking handler cannot stall the loop.
    """

    _asyncio = True

    def __init__(self, endpoints: EndpointArg, handler: Handler, *, concurrency: int = 100, **kwargs: Any) -> None:
        super().__init__(endpoints, handler, **kwargs)
        self._limit = asyncio.Semaphore(concurrency)
        self._handler_is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None))  # noqa: B004 - an object whose __call__ is async
        self._tasks: set[asyncio.Task[None]] = set()

    async def _answer(self, route: list[bytes], request: Envelope) -> None:
        try:
            if not self._wanted(request):
                return
            try:
                if self._handler_is_async:
                    result = await self.handler(request)
                else:
                    result = await asyncio.get_running_loop().run_in_executor(None, self.handler, request)
                    if inspect.isawaitable(result):
                        result = await result
                out = self._reply(route, request, result)
            except Exception as exc:
                out = self._reply(route, request, exc=exc)
            if not self._closed:
                try:
                    send_frames(self._sync_sock, out, _NOBLOCK)
                    self.stats.sent += 1
                    self._last_reply = time.monotonic()
                except zmq.ZMQError as exc:
                    self._undeliverable(exc)
                rearm(self._sock)  # serve() may be waiting in a poll
        finally:
            self._limit.release()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        wait = 0.0 if self._closed else self._grace_left(None)
        if wait > 0:
            await asyncio.sleep(wait)  # close()'s grace, without holding up the loop
        self.close()

    async def serve(self, *, max_requests: int | None = None) -> None:
        """Handle requests until stop(), cancellation, or `max_requests` received."""
        self._check_open()
        handled = 0
        try:
            while not self._stop.is_set() and (max_requests is None or handled < max_requests):
                try:  # what is waiting is taken at once; only waiting goes through the loop (at most 100 ms: stop())
                    frames, first = recv_frames_first(self._sync_sock, zmq.NOBLOCK)
                except zmq.Again:
                    await self._sock.poll(100, zmq.POLLIN)
                    continue
                handled += 1
                parsed = self._parse(frames, user_of(first) if self.permissions is not None else None)
                if parsed is None:
                    continue
                route, requests = parsed
                handled += len(requests) - 1
                for request in requests:  # each answered on its own: handlers run concurrently
                    await self._limit.acquire()
                    task = asyncio.ensure_future(self._answer(route, request))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in self._tasks:
                task.cancel()


# ---- requester -------------------------------------------------------------------------


class _RequesterBase:
    """The no-I/O half of a requester: request envelopes, sockets by generation, the flow."""

    _asyncio = False

    def __init__(
        self,
        endpoints: EndpointArg,
        *,
        service: str = "",
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        retries: int = DEFAULT_REQUEST_RETRIES,
        bind: bool | None = None,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        if timeout <= 0 or retries < 0:
            raise FabricError(f"timeout must be > 0 and retries >= 0, got {timeout!r} and {retries!r}")
        self.service = service
        self.timeout = timeout
        self.retries = retries
        self._specs = parse_many(endpoints, bind=bind, default_bind=False)
        self.stats = RequestCounters()
        self.flow = RequestFlow(self.stats)
        self._ids = IdSource()
        self._pack = msgpack.Packer().pack
        self._stamp = codec.Stamp(self._ids, service, Kind.REQUEST)
        self._owner = _DealerOwner(self._specs, options=options, context=context, asyncio=self._asyncio,
                                   tune={zmq.ROUTING_ID: batch_taking_id()})
        self.options = self._owner.options
        self.endpoints = self._owner.endpoints
        self._who = f"{type(self).__name__} on {self.endpoint}"
        self._sockets: dict[int, Any] = {0: self._owner._sock}  # generation -> socket of this face
        self._receive_timeout: tuple[int, float] | None = None
        """(generation, seconds) of the receive timeout last set, for `Requester._alone`."""

    @property
    def endpoint(self) -> str:
        """The first replier endpoint."""
        return self.endpoints[0]

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self._owner.closed

    def _limits(self, timeout: float | Unset, retries: int | Unset) -> tuple[float, int]:
        """(timeout, retries) of a call: its own or this requester's; FabricError when out of range."""
        self._owner._check_open()
        t = self.timeout if timeout is UNSET else timeout
        r = self.retries if retries is UNSET else retries
        if t <= 0 or r < 0:
            raise FabricError(f"timeout must be > 0 and retries >= 0, got {t!r} and {r!r}")
        return t, r

    def _prepare(self, body: Any, headers: Mapping[str, Any] | None, t: float, r: int) -> tuple[Envelope, list[Any]]:
        """A new request's envelope and frames, put in flight; EncodeError (and nothing in flight) if the body or
        headers cannot be encoded."""
        if self._stamp.topic != self.service:  # `service` was changed since
            self._stamp = codec.Stamp(self._ids, self.service, Kind.REQUEST)
        sent_at = time.time()
        if not headers and codec.is_plain(body):
            env, message = self._stamp.plain(body, sent_at, None, sent_at + t * (r + 1))
            frames = [message]
        else:
            env, frames = self._stamp.encode(body, sent_at, sent_at + t * (r + 1), headers)
        self.flow.submit(env, t, r, time.monotonic())
        return env, frames

    def _outgoing(self, bodies: Sequence[Any], headers: Mapping[str, Any] | None, t: float, r: int, per: int,
                  generation: int, *, track: Callable[[bytes, int], None],
                  failed: Callable[[int, EncodeError], None]) -> Iterator[tuple[int, list[Any], int]]:
        """(generation, frames, request count) of the messages that carry a request per body, `per` to a message,
        each yielded as soon as it is complete so that the first goes out before the rest are built. Each request
        is put in flight (`track(id, index)`) as it is encoded; a body that cannot be encoded goes to
        `failed(index, error)` instead, and only it fails."""
        prepare = self._prepare

        def encoded(alone: bool) -> Iterator[tuple[Any, ...]]:
            """(generation, frames, 1) per request when each goes `alone`; else (envelope, frames), to be grouped
            (one generator fewer for each request that goes alone)."""
            for i, body in enumerate(bodies):
                try:
                    env, frames = prepare(body, headers, t, r)
                except EncodeError as exc:
                    failed(i, exc)
                    continue
                track(env.id, i)
                yield (generation, frames, 1) if alone else (env, frames)

        if per == 1:  # a message per request: nothing to group
            return encoded(True)
        batches: Iterator[tuple[list[Envelope], list[Any]]] = codec.group_batches(encoded(False), per, BATCH_BYTES)
        return ((generation, frames, len(group)) for group, frames in batches)

    def _judge(self, env: Envelope) -> list[tuple[bytes, Any]]:
        """(request id, outcome) of one received envelope if it answers a pending request; counted either way."""
        self.stats.received += 1
        done = self.flow.on_reply(env)
        return [] if done is None else [done]

    def _decode_replies(self, frames: list[bytes]) -> list[tuple[bytes, Any]]:
        """(request id, outcome) of each reply to a pending request in one received message (a reply or a batch)."""
        if len(frames) == 1:  # one reply, the commonest message: the shortest way
            try:
                env = _decode_message(frames[0])
            except DecodeError as exc:
                count_bad(exc, self.stats, self._who)
                return []
            return self._judge(env)
        envs = decode_counted(frames, self.stats, self._who, codec.decode_many)
        if envs is None:
            return []
        if len(envs) == 1:
            done = self.flow.on_reply(envs[0])
            return [] if done is None else [done]
        self.stats.received += len(envs) - 1
        on_reply = self.flow.on_reply
        return [done for env in envs if (done := on_reply(env)) is not None]

    def _batch_size(self, count: int, batch: int | None) -> int:
        """Requests per ZeroMQ message for `count` requests: spread over the repliers this requester
        connects to (a batch goes to one replier), at most BATCH_MAX; 1 when it binds (how many
        repliers connect is unknown)."""
        if batch is not None:
            if type(batch) is not int or batch < 1:
                raise ConfigError(f"batch must be a positive integer, got {batch!r}")
            return batch
        connected = sum(1 for spec in self._specs if not spec.bind)
        if connected == 0 or count <= 1:
            return 1
        messages = -(-count // BATCH_MAX)
        messages = -(-messages // connected) * connected  # as many to each replier
        return -(-count // messages)

    def _new_generation(self) -> Any:
        sock, _ = open_socket(self._owner._ctx, zmq.DEALER, self._specs, self.options,
                              tune={**_DealerOwner._tune, zmq.ROUTING_ID: batch_taking_id()})
        self._sockets[self.flow.generation] = sock
        return sock

    def _close_idle(self) -> None:
        for g in self.flow.idle_generations(list(self._sockets)):
            self._retire(g)

    def _retire(self, generation: int) -> None:
        self._sockets.pop(generation).close(0)

    def close(self, linger_ms: int | None = None) -> None:
        """Close every socket; requests still waiting fail with ClosedError."""
        if self._owner.closed:
            return
        for g in list(self._sockets):
            if g != 0:
                self._retire(g)
        self._sockets.clear()
        self._owner.close(0 if linger_ms is None else linger_ms)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {', '.join(self.endpoints)}>"


class _DealerOwner(SocketOwner):
    _socket_type = zmq.DEALER
    _tune = {zmq.IMMEDIATE: 1}

    def __init__(self, endpoints: Sequence[Endpoint], *, asyncio: bool, **kwargs: Any) -> None:
        self._asyncio = asyncio  # type: ignore[misc]
        super().__init__(endpoints, **kwargs)


class Requester(_RequesterBase):
    """Sends requests and waits for their replies; `request_many` keeps them all in flight at once."""

    def request(self, body: Any, *, headers: Mapping[str, Any] | None = None,
                timeout: float | Unset = UNSET, retries: int | Unset = UNSET) -> Any:
        """The reply body; raises RequestTimeout after every attempt timed out, RemoteError if the handler raised."""
        t, r = self._limits(timeout, retries)
        if (not self.flow.pending and len(self._sockets) == 1 and headers is None and codec.is_plain(body)
                and self._stamp.topic == self.service):  # alone in flight, one socket: the short way
            return self._alone(body, t, r)
        env, frames = self._prepare(body, headers, t, r)
        return self._settle(env.id, [(self.flow.generation, frames, 1)])

    def _settle(self, rid: bytes, outgoing: list[tuple[int, list[Any], int]]) -> Any:
        """The outcome of request `rid` (in flight), sending `outgoing` first: its reply body, or its error raised."""
        results: list[Any] = [None]
        self._collect(outgoing, {rid: 0}, results)
        if isinstance(results[0], FabricError):
            raise results[0]
        return results[0]

    def _alone(self, body: Any, t: float, r: int) -> Any:
        """request() when nothing else is in flight: send, block in a receive until the attempt is due, and
        return the reply's body. The flow records the request only if anything else happens (a full socket, a
        timeout, an error reply, a stray or an undecodable message): _settle then does the rest, as for any
        request. A lone request that is answered at once, the commonest, keeps no timer and no record."""
        flow = self.flow
        sent_at = time.time()
        env, message = self._stamp.plain(body, sent_at, None, sent_at + t * (r + 1))
        generation = flow.generation
        sock = self._sockets[generation]
        try:
            SEND(sock, message, _NOBLOCK)
        except zmq.Again:
            flow.submit(env, t, r, time.monotonic())
            return self._settle(env.id, [(generation, [message], 1)])
        started = time.monotonic()
        if flow.generation_born is None:
            flow.generation_born = started
        stats = self.stats
        stats.sent += 1
        wait = (generation, t)
        if wait != self._receive_timeout:  # set once per socket and timeout, not per request
            sock.setsockopt(zmq.RCVTIMEO, wait_ms(t))
            self._receive_timeout = wait
        rid = env.id
        try:  # a receive that waits wakes sooner than a poll and a receive (about 10 us of a 100 us round trip)
            first = RECV(sock, 0, False)
        except zmq.Again:  # the attempt is due with no reply
            flow.submit(env, t, r, started)
            return self._settle(rid, [])
        if not first.more:
            # A zfabric replier's reply, checked in a few slices: of a copy when small (cheaper), else in place.
            body = self._stamp.reply_body(first.bytes if len(first) < ZERO_COPY_MIN else first.buffer, rid)
            if body is not _NOT_A_REPLY:
                stats.received += 1
                stats.replies += 1
                return body
            try:  # anyone else's well-formed reply
                reply = _decode_message(first)
            except DecodeError:
                reply = None
            if reply is not None and reply.kind is _REPLY and reply.correlation_id == rid:
                stats.received += 1
                stats.replies += 1
                return reply.body
        else:
            reply = None
        flow.submit(env, t, r, started)  # anything else, as any reply is handled (counted once, there)
        # A valid envelope (an error reply, a stray) is judged as decoded; anything else is decoded the general way.
        for done, outcome in self._judge(reply) if reply is not None else self._decode_replies(recv_rest(sock, first)):
            if done == rid:
                if isinstance(outcome, FabricError):
                    raise outcome
                return outcome
        return self._settle(rid, [])

    def request_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None,
                     timeout: float | Unset = UNSET, retries: int | Unset = UNSET,
                     return_exceptions: bool = False, batch: int | None = None) -> list[Any]:
        """Reply bodies in request order, all requests in flight together.

        Requests travel in batches (many per ZeroMQ message, answered in batches): by default
        spread evenly over the endpoints this requester connects to, at most BATCH_MAX per
        message; `batch=1` sends each on its own. Each request keeps its own timeout and retries.
        With `return_exceptions`, a failed request's exception takes its place in the list;
        otherwise the first failure (in request order) is raised once all are settled.
        """
        bodies = list(bodies)
        t, r = self._limits(timeout, retries)
        per = self._batch_size(len(bodies), batch)
        results: list[Any] = [None] * len(bodies)
        order: dict[bytes, int] = {}
        self._collect(self._outgoing(bodies, headers, t, r, per, self.flow.generation, track=order.__setitem__,
                                     failed=results.__setitem__), order, results)
        if not return_exceptions:
            for item in results:
                if isinstance(item, FabricError):
                    raise item
        return results

    def _collect(self, outgoing: Iterable[tuple[int, list[Any], int]], order: dict[bytes, int],
                 results: list[Any]) -> None:
        """Send `outgoing` (generation, frames, request count) and wait until every request in `order` (id ->
        index, filled in as they are sent) has its outcome in `results`: a reply body or an exception."""
        try:
            outbox = self._flush(outgoing)
            while order:
                due = self.flow.next_due()
                wait = 100 if due is None else wait_ms(due - time.monotonic())
                current = self._sockets[self.flow.generation]
                zmq.zmq_poll([(s, _POLLIN | (_POLLOUT if outbox and s is current else 0)) for s in self._sockets.values()], wait)
                for sock in self._sockets.values():
                    for frames in waiting(sock, len(order)):  # not one receive more: a receive that finds nothing
                        for rid, outcome in self._decode_replies(frames):  # costs ~10 us just after a wake-up
                            if rid in order:
                                results[order.pop(rid)] = outcome
                if due is not None and time.monotonic() >= due:  # some attempt timed out: fail or resend it
                    failures, resend, fresh = self.flow.expire(time.monotonic())
                    for rid, exc in failures:
                        if rid in order:
                            results[order.pop(rid)] = exc
                    if fresh:
                        self._new_generation()
                    outbox.extend((self.flow.generation, codec.encode(env, self._pack), 1) for env in resend)
                if len(self._sockets) > 1:
                    self._close_idle()
                if outbox:
                    outbox = self._flush(outbox)
        finally:
            for rid in order:  # interrupted (Ctrl-C, close): never resend these on a later call
                self.flow.forget(rid)

    def _flush(self, outbox: Iterable[tuple[int, list[Any], int]]) -> list[tuple[int, list[Any], int]]:
        """Send what the sockets take now; returns the rest."""
        pending = iter(outbox)
        for item in pending:
            gen, frames, count = item
            sock = self._sockets.get(gen) or self._sockets[self.flow.generation]
            try:
                send_frames(sock, frames, _NOBLOCK)
            except zmq.Again:
                return [item, *pending]
            self.stats.sent += count
        return []


class AsyncRequester(_RequesterBase):
    """The asyncio face: `await request(body)` from any number of tasks at once, all on one socket."""

    _asyncio = True

    def __init__(self, endpoints: EndpointArg, **kwargs: Any) -> None:
        super().__init__(endpoints, **kwargs)
        self._futures: dict[bytes, asyncio.Future[Any]] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._shadows: dict[int, zmq.Socket[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None

    async def request(self, body: Any, *, headers: Mapping[str, Any] | None = None,
                      timeout: float | Unset = UNSET, retries: int | Unset = UNSET) -> Any:
        """The reply body; raises RequestTimeout after every attempt timed out, RemoteError if the handler raised."""
        (outcome,) = self._launch([body], headers, timeout, retries, 1)
        return await outcome

    async def request_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None,
                           timeout: float | Unset = UNSET, retries: int | Unset = UNSET,
                           return_exceptions: bool = False, batch: int | None = None) -> list[Any]:
        """Reply bodies in request order, all in flight together (like asyncio.gather), sent in batches
        as `Requester.request_many` sends them."""
        bodies = list(bodies)
        if not bodies:
            return []
        return await asyncio.gather(*self._launch(bodies, headers, timeout, retries, batch),
                                    return_exceptions=return_exceptions)

    def _launch(self, bodies: Sequence[Any], headers: Mapping[str, Any] | None, timeout: float | Unset,
                retries: int | Unset, batch: int | None) -> list[Coroutine[Any, Any, Any]]:
        """Put a request per body in flight, each sent as soon as it is encoded; returns what to await for each
        body's outcome (its reply, or its failure: a body that cannot be encoded fails alone)."""
        t, r = self._limits(timeout, retries)
        per = self._batch_size(len(bodies), batch)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in bodies]
        ids: list[bytes | None] = [None] * len(bodies)
        generation = self.flow.generation
        if generation not in self._readers:
            self._start_reader(generation)

        def track(rid: bytes, i: int) -> None:
            self._futures[rid] = futures[i]
            ids[i] = rid

        try:
            for _, frames, count in self._outgoing(bodies, headers, t, r, per, generation, track=track,
                                                   failed=lambda i, exc: futures[i].set_exception(exc)):
                self._send_frames(generation, frames, count)
        except BaseException:
            for rid in ids:  # nobody will wait for these: never resend them
                if rid is not None and self._futures.pop(rid, None) is not None:
                    self.flow.forget(rid)
            raise
        self._rearm(generation)
        self._arm_timer()
        return [self._settle(rid, fut) for rid, fut in zip(ids, futures)]

    async def _settle(self, rid: bytes | None, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        finally:
            if rid is not None and self._futures.pop(rid, None) is not None:
                self.flow.forget(rid)

    def _start_reader(self, generation: int) -> None:
        self._readers[generation] = asyncio.ensure_future(self._read(generation, self._sockets[generation]))

    def _shadow(self, generation: int) -> zmq.Socket[Any]:
        """A sync socket on a generation's ZeroMQ socket (see SocketOwner._sync_sock). Only while the generation
        is live: retiring closes the ZeroMQ socket, and a shadow cannot know it."""
        sock = self._shadows.get(generation)
        if sock is None:
            sock = self._shadows[generation] = zmq.Socket.shadow(self._sockets[generation].underlying)
        return sock

    def _rearm(self, generation: int) -> None:
        """After sends through the shadow: the generation's reader may be waiting (see `rearm`)."""
        sock = self._sockets.get(generation)
        if sock is not None:
            rearm(sock)

    async def _read(self, generation: int, sock: Any) -> None:
        """Settle the futures of the replies that arrive."""
        while generation in self._sockets:
            try:
                frames = await next_frames(sock, self._shadow(generation))
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            replies = self._decode_replies(frames)
            for rid, outcome in replies:
                fut = self._futures.pop(rid, None)
                if fut is not None and not fut.done():
                    if isinstance(outcome, FabricError):
                        fut.set_exception(outcome)
                    else:
                        fut.set_result(outcome)
            if replies:
                self._close_idle()

    def _send_frames(self, generation: int, frames: list[Any], count: int) -> None:
        """Send at once when the socket takes it; else through pyzmq's asyncio send, not awaited: the request's
        own timer covers a send that never completes (no replier connected yet, with IMMEDIATE), and a retired
        socket cancels its pending sends."""
        try:
            send_frames(self._shadow(generation), frames, _NOBLOCK)
        except zmq.Again:
            sent = self._sockets[generation].send_multipart(frames)
            sent.add_done_callback(lambda fut: self._sent(fut, count))
            return
        self.stats.sent += count

    def _sent(self, fut: asyncio.Future[Any], count: int) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.stats.sent += count

    def _arm_timer(self) -> None:
        due = self.flow.next_due()
        if due is None or due == self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_due = due
        self._timer = loop.call_at(loop.time() + max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_due = None
        failures, resend, fresh = self.flow.expire(time.monotonic())
        for rid, exc in failures:
            fut = self._futures.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        if fresh:
            self._new_generation()
            self._start_reader(self.flow.generation)
        for env in resend:
            self._send_frames(self.flow.generation, codec.encode(env, self._pack), 1)
        if resend:
            self._rearm(self.flow.generation)
        self._close_idle()
        self._arm_timer()

    def _retire(self, generation: int) -> None:
        reader = self._readers.pop(generation, None)
        if reader is not None:
            reader.cancel()
        self._shadows.pop(generation, None)
        super()._retire(generation)

    def close(self, linger_ms: int | None = None) -> None:
        """Close every socket; requests still waiting fail with ClosedError."""
        if self._timer is not None:
            self._timer.cancel()
        for reader in self._readers.values():
            reader.cancel()
        for fut in list(self._futures.values()):
            if not fut.done():
                fut.set_exception(ClosedError("requester closed while the request was waiting"))
        self._futures.clear()
        self._shadows.clear()
        super().close(linger_ms)

