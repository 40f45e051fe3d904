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
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from .. import codec
from .._counters import Counters
from .._logs import Throttled
from .._receive import decode_counted
from .._socket import (
    AnyContext,
    SocketOwner,
    open_socket,
    recv_frames,
    recv_frames_with_user,
    send_frames,
    waiting,
)
from ..endpoint import Endpoint, EndpointArg, parse_many
from ..envelope import Envelope, IdSource, Kind
from ..errors import ClosedError, ConfigError, EncodeError, FabricError
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


_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


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

    def _parse(self, frames: list[bytes], who: str | None = None) -> tuple[list[bytes], Envelope] | None:
        """(routing prefix, request) for a valid request a permitted key sent; None (counted) otherwise."""
        if len(frames) >= 3 and frames[1] == b"":  # from a REQ socket: [id, "", message...]
            route, payload = frames[:2], frames[2:]
        else:
            route, payload = frames[:1], frames[1:]
        env = decode_counted(payload, self.stats, self._who)
        if env is None:
            return None
        if env.kind is not Kind.REQUEST:
            self.stats.invalid += 1
            self._bad_log.warning("kind", "replier %s: ignored a %s envelope (expected a request)", self.endpoint, env.kind.name)
            return None
        if self.permissions is not None and not self.permissions.may_use_service(who, self.name):
            self.stats.denied += 1
            self._bad_log.warning(f"denied|{who}", "replier %s: key %s may not use service %r; request dropped",
                                  self.endpoint, who, self.name)
            return None
        self.stats.requests += 1
        return route, env

    def _wanted(self, request: Envelope) -> bool:
        """False (and counted) when the requester's deadline passed before the handler could run."""
        if request.expired():
            self.stats.expired += 1
            return False
        return True

    def _reply(self, route: list[bytes], request: Envelope, result: Any = None, exc: BaseException | None = None) -> list[Any]:
        """The frames that answer `request` with `result` or with the exception `exc`."""
        if exc is None:
            try:
                frames = self._encode_answer(Kind.REPLY, request, result)
            except EncodeError as err:
                exc = err
            else:
                self.stats.replies += 1
                return [*route, *frames]
        self.stats.errors += 1
        return [*route, *self._encode_answer(Kind.ERROR, request, error_body(exc))]

    def _encode_answer(self, kind: Kind, request: Envelope, body: Any) -> list[Any]:
        """A reply's frames, packed by this replier's own Packer (replies run on one thread or loop)."""
        return codec.encode_fields(self._pack, kind, self._ids.next(), request.topic, request.id, None, request.attempt,
                                   time.time(), None, {}, None, body)

    def _undeliverable(self, exc: zmq.ZMQError) -> None:
        self.stats.undeliverable += 1
        self._bad_log.warning("undeliverable", "replier %s: reply not delivered (%s); the requester is gone or full",
                              self.endpoint, exc.strerror)

    def stop(self) -> None:
        """Ask serve() to return (from any thread); it does within about 100 ms."""
        self._stop.set()


class Replier(_ReplierBase):
    """Serves requests with a handler, one at a time, in the thread that calls serve()."""

    def handle_one(self, frames: list[bytes], who: str | None = None) -> None:
        """Answer one received message from key `who` (or count why not)."""
        parsed = self._parse(frames, who)
        if parsed is None:
            return
        route, request = parsed
        if not self._wanted(request):
            return
        try:
            out = self._reply(route, request, self.handler(request))
        except Exception as exc:
            out = self._reply(route, request, exc=exc)
        try:
            send_frames(self._sock, out, zmq.NOBLOCK)
            self.stats.sent += 1
        except zmq.ZMQError as exc:
            self._undeliverable(exc)

    def serve(self, *, max_requests: int | None = None) -> None:
        """Handle requests until stop() (or `max_requests` handled)."""
        self._check_open()
        sock = self._sock
        handled = 0
        checked = self.permissions is not None
        # A blocking receive with a timeout wakes up faster than poll-then-receive, and
        # the timeout lets stop() be noticed within 100 ms.
        sock.setsockopt(zmq.RCVTIMEO, 100)
        try:
            while not self._stop.is_set() and (max_requests is None or handled < max_requests):
                try:
                    frames, who = recv_frames_with_user(sock) if checked else (recv_frames(sock), None)
                except zmq.Again:
                    continue
                self.handle_one(frames, who)
                handled += 1
        finally:
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
                    await self._sock.send_multipart(out, zmq.NOBLOCK)
                    self.stats.sent += 1
                except zmq.ZMQError as exc:
                    self._undeliverable(exc)
        finally:
            self._limit.release()

    async def serve(self, *, max_requests: int | None = None) -> None:
        """Handle requests until stop(), cancellation, or `max_requests` received."""
        self._check_open()
        handled = 0
        try:
            while not self._stop.is_set() and (max_requests is None or handled < max_requests):
                if not await self._sock.poll(100, zmq.POLLIN):
                    continue
                raw = await self._sock.recv_multipart(copy=False)
                handled += 1
                who = raw[0].get("User-Id") if self.permissions is not None else None
                parsed = self._parse([f.bytes for f in raw], who if isinstance(who, str) else None)
                if parsed is None:
                    continue
                await self._limit.acquire()
                task = asyncio.ensure_future(self._answer(*parsed))
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
        self._owner = _DealerOwner(self._specs, options=options, context=context, asyncio=self._asyncio)
        self.options = self._owner.options
        self.endpoints = self._owner.endpoints
        self._who = f"{type(self).__name__} on {self.endpoint}"
        self._sockets: dict[int, Any] = {0: self._owner._sock}  # generation -> socket of this face

    @property
    def endpoint(self) -> str:
        """The first replier endpoint."""
        return self.endpoints[0]

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self._owner.closed

    def _request(self, body: Any, headers: Mapping[str, Any] | None, timeout: float | Unset, retries: int | Unset,
                 ) -> tuple[Envelope, float, int]:
        self._owner._check_open()
        t = self.timeout if timeout is UNSET else timeout
        r = self.retries if retries is UNSET else retries
        if t <= 0 or r < 0:
            raise FabricError(f"timeout must be > 0 and retries >= 0, got {t!r} and {r!r}")
        now = time.time()
        env = Envelope(self._ids.next(), Kind.REQUEST, self.service, body, None, None, 1, now, now + t * (r + 1),
                       headers if headers is not None else {}, None)
        return env, t, r

    def _decode_reply(self, frames: list[bytes]) -> tuple[bytes, Any] | None:
        env = decode_counted(frames, self.stats, self._who)
        return None if env is None else self.flow.on_reply(env)

    def _new_generation(self) -> Any:
        sock, _ = open_socket(self._owner._ctx, zmq.DEALER, self._specs, self.options, tune=_DealerOwner._tune)
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
        return self.request_many([body], headers=headers, timeout=timeout, retries=retries)[0]

    def request_many(self, bodies: Iterable[Any], *, headers: Mapping[str, Any] | None = None,
                     timeout: float | Unset = UNSET, retries: int | Unset = UNSET,
                     return_exceptions: bool = False) -> list[Any]:
        """Reply bodies in request order, all requests in flight together.

        With `return_exceptions`, a failed request's exception takes its place in the list;
        otherwise the first failure (in request order) is raised once all are settled.
        """
        now = time.monotonic()
        order: dict[bytes, int] = {}
        outbox: list[tuple[int, Envelope]] = []
        for body in bodies:
            env, t, r = self._request(body, headers, timeout, retries)
            self.flow.submit(env, t, r, now)
            order[env.id] = len(order)
            outbox.append((self.flow.generation, env))
        results: list[Any] = [None] * len(order)
        left = len(order)
        while left:
            outbox = self._flush(outbox)
            due = self.flow.next_due()
            wait = 100 if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
            current = self._sockets[self.flow.generation]
            zmq.zmq_poll([(s, _POLLIN | (_POLLOUT if outbox and s is current else 0)) for s in self._sockets.values()], wait)
            for sock in self._sockets.values():
                for frames in waiting(sock, left):  # not one receive more: a receive that finds nothing costs
                    done = self._decode_reply(frames)  # ~10 us just after a wake-up, on the round trip's path
                    if done is not None and done[0] in order:
                        results[order[done[0]]] = done[1]
                        left -= 1
            if due is not None and time.monotonic() >= due:  # some attempt timed out: fail or resend it
                failures, resend, fresh = self.flow.expire(time.monotonic())
                for rid, exc in failures:
                    if rid in order:
                        results[order[rid]] = exc
                        left -= 1
                if fresh:
                    self._new_generation()
                outbox.extend((self.flow.generation, env) for env in resend)
            if len(self._sockets) > 1:
                self._close_idle()
        if not return_exceptions:
            for item in results:
                if isinstance(item, FabricError):
                    raise item
        return results

    def _flush(self, outbox: list[tuple[int, Envelope]]) -> list[tuple[int, Envelope]]:
        for i, (gen, env) in enumerate(outbox):
            sock = self._sockets.get(gen) or self._sockets[self.flow.generation]
            try:
                send_frames(sock, codec.encode(env, self._pack), zmq.NOBLOCK)
            except zmq.Again:
                return outbox[i:]
            self.stats.sent += 1
        return []


class AsyncRequester(_RequesterBase):
    """The asyncio face: `await request(body)` from any number of tasks at once, all on one socket."""

    _asyncio = True

    def __init__(self, endpoints: EndpointArg, **kwargs: Any) -> None:
        super().__init__(endpoints, **kwargs)
        self._futures: dict[bytes, asyncio.Future[Any]] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None

    async def request(self, body: Any, *, headers: Mapping[str, Any] | None = None,
                      timeout: float | Unset = UNSET, retries: int | Unset = UNSET) -> Any:
        """The reply body; raises RequestTimeout after every attempt timed out, RemoteError if the handler raised."""
        env, t, r = self._request(body, headers, timeout, retries)
        loop = asyncio.get_running_loop()
        self.flow.submit(env, t, r, time.monotonic())
        fut: asyncio.Future[Any] = loop.create_future()
        self._futures[env.id] = fut
        if self.flow.generation not in self._readers:
            self._start_reader(self.flow.generation)
        self._send(self.flow.generation, env)
        self._arm_timer()
        try:
            return await fut
        finally:
            if self._futures.pop(env.id, None) is not None:
                self.flow.forget(env.id)

    async def request_many(self, bodies: Iterable[Any], *, return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """Reply bodies in request order, all in flight together (like asyncio.gather)."""
        return await asyncio.gather(*(self.request(b, **kwargs) for b in bodies), return_exceptions=return_exceptions)

    def _start_reader(self, generation: int) -> None:
        self._readers[generation] = asyncio.ensure_future(self._read(generation, self._sockets[generation]))

    async def _read(self, generation: int, sock: Any) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            done = self._decode_reply(frames)
            if done is not None:
                fut = self._futures.pop(done[0], None)
                if fut is not None and not fut.done():
                    if isinstance(done[1], FabricError):
                        fut.set_exception(done[1])
                    else:
                        fut.set_result(done[1])
                self._close_idle()

    def _send(self, generation: int, env: Envelope) -> None:
        # No await: the request's own timer covers a send that never completes (no replier
        # connected yet, with IMMEDIATE), and a retired socket cancels its pending sends.
        sent = self._sockets[generation].send_multipart(codec.encode(env, self._pack))
        sent.add_done_callback(self._sent)

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.stats.sent += 1

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
            self._send(self.flow.generation, env)
        self._close_idle()
        self._arm_timer()

    def _retire(self, generation: int) -> None:
        reader = self._readers.pop(generation, None)
        if reader is not None:
            reader.cancel()
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
        super().close(linger_ms)

