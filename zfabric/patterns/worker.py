"""Workers: take messages from a reliable queue's sidecar, run a handler, acknowledge or fail each one.

The handler's outcome decides the message's fate: it returns (ack), raises (nack; the
sidecar retries with backoff, then dead-letters), raises RetryAfter (retry after that
delay) or DoNotRetry, or an exception type listed in `no_retry` (dead-letter now). A
worker holds at most `window` unacknowledged messages, and heartbeats keep its lease: if
it dies or freezes, the sidecar gives its messages to another worker.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket as _socketlib
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from .._counters import Counters
from .._receive import decode_counted
from .._socket import (
    AnyContext,
    SocketOwner,
    open_socket,
    readable,
    recv_frames,
    send_frames,
)
from ..endpoint import EndpointArg, parse_many
from ..envelope import Envelope
from ..errors import ConfigError, DecodeError, DoNotRetry, RetryAfter
from ..options import SocketOptions
from ..sidecar import protocol as p

Handler = Callable[[Envelope], Any]
ACK_BATCH = 64
"""Acknowledgements sent together at most; fewer when no more messages are waiting."""
_NOBLOCK = int(zmq.NOBLOCK)


@dataclass
class WorkerCounters(Counters):
    """`received` deliveries; how each ended; how often the sidecar asked this worker to announce itself again."""

    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reannounced: int = 0


class _WorkerBase(SocketOwner):
    """The no-I/O half of a worker: protocol frames and what a handler's outcome means."""

    _socket_type = zmq.DEALER

    def __init__(
        self,
        endpoints: EndpointArg,
        queue: str,
        handler: Handler,
        *,
        window: int = 100,
        name: str | None = None,
        heartbeat: float = 1.0,
        no_retry: tuple[type[BaseException], ...] = (),
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        if not callable(handler):
            raise ConfigError("Worker: handler must be callable (it receives each Envelope)")
        if type(window) is not int or window < 1:
            raise ConfigError(f"Worker: window must be a positive integer, got {window!r}")
        if heartbeat <= 0:
            raise ConfigError(f"Worker: heartbeat must be a positive number of seconds, got {heartbeat!r}")
        super().__init__(parse_many(endpoints, bind=False, default_bind=False), options=options, context=context)
        self.queue = queue
        self.handler = handler
        self.window = window
        self.heartbeat = heartbeat
        self.no_retry = tuple(no_retry)
        self.worker_id = os.urandom(8)
        self.name = name or f"{_socketlib.gethostname()}:{os.getpid()}"
        self.stats = WorkerCounters()
        self._acks: list[list[Any]] = []
        self._stop = threading.Event()
        self._reannounce = threading.Event()

    def _ready_frames(self) -> list[bytes]:
        return [p.READY, p.pack({"worker": self.worker_id, "name": self.name, "queue": self.queue, "window": self.window,
                                 "dlv": p.DLV_PACKED})]

    def _heartbeat_frames(self) -> list[bytes]:
        return [p.HEARTBEAT, p.pack({"worker": self.worker_id})]

    def _take_acks(self) -> list[bytes] | None:
        if not self._acks:
            return None
        acks, self._acks = self._acks, []
        return [p.ACK, p.pack({"worker": self.worker_id, "acks": acks})]

    def _incoming(self, frames: list[bytes]) -> list[Envelope]:
        """The delivered envelopes, or none after handling a control message (WHO, an error)."""
        cmd = frames[0] if frames else b""
        if cmd == p.DELIVER:
            try:
                triples = p.split_deliveries(frames[1:])
            except DecodeError:
                self.stats.decode_errors += 1
                return []
            out = []
            for attempt, header, body in triples:
                env = decode_counted([header, body], self.stats, self._who)
                if env is not None:
                    out.append(env._replace(attempt=attempt))
            return out
        if cmd == p.WHO:
            self._reannounce.set()
        elif cmd == p.CONTROL_ERROR and len(frames) == 2:
            raise ConfigError(f"{self._who}: the sidecar refused this worker: {p.unpack(frames[1], 'CTE')}")
        else:
            self.stats.decode_errors += 1
        return []

    def _outcome(self, env: Envelope, exc: BaseException | None) -> list[bytes] | None:
        """Record an ack (sent in a batch) or return the NAK frames for a failure."""
        if exc is None:
            self.stats.acked += 1
            self._acks.append([env.id, env.attempt])
            return None
        self.stats.failed += 1
        retryable, retry_after = True, None
        cause: BaseException = exc
        if isinstance(exc, RetryAfter):
            retry_after = exc.delay
        elif isinstance(exc, DoNotRetry) or isinstance(exc, self.no_retry):
            retryable = False
            cause = exc.__cause__ if isinstance(exc, DoNotRetry) and exc.__cause__ is not None else exc
        if not retryable:
            self.stats.dead_lettered += 1
        tb = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__, limit=8))
        return [p.NACK, p.pack({
            "worker": self.worker_id, "id": env.id, "attempt": env.attempt,
            "error_type": type(cause).__name__, "error": str(cause)[:2000], "traceback": tb[-8000:],
            "retry_after": retry_after, "retryable": retryable,
        })]

    def _done(self, handled: int, max_messages: int | None) -> bool:
        """True once stop() was called or `max_messages` are handled (the rest go back with BYE)."""
        return self._stop.is_set() or (max_messages is not None and handled >= max_messages)

    def _announce_again(self) -> list[bytes] | None:
        """RDY frames when the sidecar asked who we are (it restarted, or our lease expired)."""
        if not self._reannounce.is_set():
            return None
        self._reannounce.clear()
        self.stats.reannounced += 1
        return self._ready_frames()

    def _settle(self, env: Envelope, error: BaseException | None) -> list[list[bytes]]:
        """What to send now for one handled message: its NAK, and a full batch of acks."""
        out = []
        nack = self._outcome(env, error)
        if nack is not None:
            out.append(nack)
        if len(self._acks) >= ACK_BATCH:
            out.append(self._take_acks())  # type: ignore[arg-type]
        return out

    def _leave(self) -> None:
        """Settle what was handled, then tell the sidecar to give the rest to other workers now (without waiting)."""
        try:
            acks = self._take_acks()
            if acks is not None:
                send_frames(self._sync_sock, acks, _NOBLOCK)
            send_frames(self._sync_sock, [p.BYE, p.pack({"worker": self.worker_id})], _NOBLOCK)
        except zmq.ZMQError:
            pass  # the sidecar is unreachable; the lease simply expires

    def stop(self) -> None:
        """Ask run() to return after the message in hand; unacknowledged ones go back to the sidecar's queue."""
        self._stop.set()


class Worker(_WorkerBase):
    """Runs a handler for each message of a reliable queue; `run()` blocks, `start()` uses a thread.

    Example:  Worker("tcp://127.0.0.1:5580", "orders", handle).run()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._thread: threading.Thread | None = None

    def run(self, *, max_messages: int | None = None) -> int:
        """Handle messages until stop() (or `max_messages`); returns how many were handled."""
        self._check_open()
        sock = self._sock
        beat = threading.Thread(target=self._beat, name="zfabric-worker-heartbeat", daemon=True)
        beat.start()
        handled = 0
        try:
            send_frames(sock, self._ready_frames())
            while not self._done(handled, max_messages):
                hello = self._announce_again()
                if hello is not None:
                    send_frames(sock, hello)
                if not readable(sock, 100):
                    continue
                while not self._done(handled, max_messages):
                    try:
                        frames = recv_frames(sock, _NOBLOCK)
                    except zmq.Again:
                        break
                    for env in self._incoming(frames):
                        if self._done(handled, max_messages):
                            break
                        handled += 1
                        error: BaseException | None = None
                        try:
                            self.handler(env)
                        except Exception as exc:
                            error = exc
                        for frames in self._settle(env, error):
                            send_frames(sock, frames)
                acks = self._take_acks()
                if acks is not None:
                    send_frames(sock, acks)
            self._leave()
        finally:
            self._stop.set()
            beat.join(self.heartbeat + 1.0)
        return handled

    def _beat(self) -> None:
        """Heartbeats from a socket of their own, so a long-running handler does not cost the lease."""
        sock, _ = open_socket(self._ctx, zmq.DEALER, self._endpoint_specs, self.options)
        try:
            frames = self._heartbeat_frames()
            next_beat = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat
                    try:
                        send_frames(sock, frames, zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # not connected right now; the next beat tries again
                # Short waits, so stop() is noticed within 100 ms, not a whole heartbeat later.
                if readable(sock, min(100, int((next_beat - now) * 1000) + 1)):
                    reply = recv_frames(sock)
                    if reply[:1] == [p.WHO]:
                        self._reannounce.set()
        finally:
            sock.close(0)

    def start(self, **kwargs: Any) -> Worker:
        """Run in a daemon thread (the worker's sockets are used only there from now on)."""
        self._thread = threading.Thread(target=self.run, kwargs=kwargs, name="zfabric-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask run() to return after the message in hand; joins the thread start() made."""
        super().stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self, linger_ms: int | None = None) -> None:
        self.stop()
        super().close(linger_ms)


class AsyncWorker(_WorkerBase):
    """The asyncio face: `await run()`. Async handlers are awaited; plain ones run in the default thread pool."""

    _asyncio = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        call = type(self.handler).__call__ if not inspect.isfunction(self.handler) else None
        self._is_async = inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(call)

    async def _handle(self, env: Envelope) -> BaseException | None:
        try:
            if self._is_async:
                await self.handler(env)
            else:
                await asyncio.get_running_loop().run_in_executor(None, self.handler, env)
        except Exception as exc:
            return exc
        return None

    async def run(self, *, max_messages: int | None = None) -> int:
        """Handle messages until stop() (or `max_messages`); returns how many were handled."""
        self._check_open()
        sock = self._sock
        beat = asyncio.get_running_loop().create_task(self._beat())
        handled = 0
        try:
            await self._asend(self._ready_frames())
            while not self._done(handled, max_messages):
                hello = self._announce_again()
                if hello is not None:
                    await self._asend(hello)
                if not await sock.poll(100, zmq.POLLIN):
                    continue
                while not self._done(handled, max_messages):
                    try:
                        incoming = self._incoming(recv_frames(self._sync_sock, _NOBLOCK))
                    except zmq.Again:
                        break
                    for env in incoming:
                        if self._done(handled, max_messages):
                            break
                        handled += 1
                        for frames in self._settle(env, await self._handle(env)):
                            await self._asend(frames)
                acks = self._take_acks()
                if acks is not None:
                    await self._asend(acks)
            self._leave()
        finally:
            beat.cancel()
        return handled

    async def _beat(self) -> None:
        frames = self._heartbeat_frames()
        while True:
            await asyncio.sleep(self.heartbeat)
            await self._sock.send_multipart(frames)

