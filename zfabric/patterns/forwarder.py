"""The pub/sub forwarder: publishers connect to its XSUB side, subscribers to its XPUB side.

Beyond moving messages it does three things raw `zmq.proxy` cannot:
- answers readiness probes, so a subscriber knows its subscription is live here;
- tells publishers how many subscriptions each prefix has (count entries, docs/wire.md),
  so a publisher can wait for N subscribers before it starts;
- keeps counters (messages in/out, subscriptions, probes, rejected control traffic).

One core, thin launchers: `run()` blocks in the calling thread, `start()` runs it in a
thread, and `zfabric forwarder` runs it as a process. Sockets are created and used only
in the thread that runs the loop; `stop()` (from any thread or a signal handler) makes it
stop taking messages within about 100 ms, and subscribers get `linger_ms` to take what it
has already forwarded.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import zmq

from .. import codec
from .._counters import CounterSet
from .._logs import Throttled
from .._process import ChildProcess
from .._socket import (
    AnyContext,
    PeerWatch,
    close_handing_over,
    context_for,
    open_socket,
    recv_frames,
    recv_frames_with_user,
    send_frames,
)
from ..endpoint import Endpoint
from ..errors import ConfigError, FabricError
from ..options import (
    DEFAULT_FORWARDER_XPUB,
    DEFAULT_FORWARDER_XSUB,
    DEFAULT_OPTIONS,
    SocketOptions,
)
from ..security.permissions import Permissions

log = logging.getLogger("zfabric.forwarder")

_BATCH = 1000
"""Messages moved per readable socket before looking at the other side again."""


@dataclass
class ForwarderCounters(CounterSet):
    """What a forwarder has done since it started."""

    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    subscriptions: int = 0
    subscribe_events: int = 0
    unsubscribe_events: int = 0
    probes: int = 0
    rejected: int = 0
    denied_publish: int = 0
    """Messages dropped because their publisher's key may not publish to the topic (or was revoked)."""
    denied_subscribe: int = 0
    """Subscriptions refused because the subscriber's key may not read the topic (or was revoked)."""


class Forwarder:
    """XSUB/XPUB forwarder with readiness probes, subscriber counts and counters."""

    def __init__(
        self,
        xsub: str | Endpoint = DEFAULT_FORWARDER_XSUB,
        xpub: str | Endpoint = DEFAULT_FORWARDER_XPUB,
        *,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
        permissions: Permissions | None = None,
    ) -> None:
        self._xsub_spec = Endpoint.parse(xsub, bind=True)
        self._xpub_spec = Endpoint.parse(xpub, bind=True)
        self.options = options if options is not None else DEFAULT_OPTIONS
        if permissions is not None and (self.options.curve is None or self.options.curve.allow is None):
            raise ConfigError("forwarder permissions need CURVE with an allowlist: a client's key is what identifies it")
        self.permissions = permissions
        """Per-key topic rules (None: every allowed client may publish and subscribe to anything)."""
        self._denied_subs: dict[tuple[str | None, bytes], int] = {}
        self._given_context = context
        self.stats = ForwarderCounters()
        self.xsub_endpoint: str | None = None
        self.xpub_endpoint: str | None = None
        self._counts: dict[bytes, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._bad_log = Throttled(log)

    def subscribers(self, prefix: str = "") -> int:
        """Live subscriptions to exactly `prefix` (as subscribers declared them)."""
        return self._counts.get(prefix.encode(), 0)

    def run(self, *, on_ready: Callable[[Forwarder], None] | None = None,
            on_tick: Callable[[Forwarder], None] | None = None, tick: float = 1.0) -> None:
        """Bind, then forward until stop(); `on_ready` runs once bound, `on_tick` every `tick` s."""
        ctx, owns = context_for(self._given_context, asyncio=False)
        xsub = xpub = None
        peers: list[PeerWatch] = []
        try:
            xsub, (self.xsub_endpoint,) = open_socket(ctx, zmq.XSUB, [self._xsub_spec], self.options)
            # With permissions, XPUB_MANUAL: a subscription takes effect only when the loop applies it.
            tune: dict[int, int] = {zmq.XPUB_MANUAL: 1} if self.permissions is not None else {zmq.XPUB_VERBOSER: 1}
            # Over ipc, stopping waits until each subscriber has read what the kernel holds for it (see
            # close_handing_over), which needs the connections from a monitor; a CURVE server's one monitor
            # may be the authenticator's.
            watch = self._xpub_spec.transport == "ipc" and self.options.curve is None
            xpub, (self.xpub_endpoint,) = open_socket(ctx, zmq.XPUB, [self._xpub_spec], self.options, tune=tune,
                                                      before_connect=(lambda s: peers.append(PeerWatch(s))) if watch else None)
            self._ready.set()
            if on_ready is not None:
                on_ready(self)
            self._loop(xsub, xpub, on_tick, tick, peers[0] if peers else None)
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()
            if xsub is not None:
                xsub.close(0)  # take nothing more
            if xpub is not None:  # after a stop, subscribers get `linger_ms` to take what was forwarded
                close_handing_over(xpub, peers[0] if peers else None, 0 if self._error else self.options.linger_ms)
            elif peers:
                peers[0].close()
            if owns:
                ctx.term()

    def _loop(self, xsub: zmq.Socket, xpub: zmq.Socket, on_tick: Callable[[Forwarder], None] | None, tick: float,
              peers: PeerWatch | None = None) -> None:
        poller = zmq.Poller()
        poller.register(xsub, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        if peers is not None:  # its events are applied as they come, or a long run with churning subscribers piles them up
            poller.register(peers.socket, zmq.POLLIN)
        stats = self.stats
        next_tick = time.monotonic() + tick
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ContextTerminated:
                return
            if xsub in ready:
                for _ in range(_BATCH):
                    try:
                        frames, who = self._receive(xsub)
                    except zmq.Again:
                        break
                    stats.messages_in += 1
                    stats.bytes_in += sum(map(len, frames))
                    if frames[0][:1] == codec.CONTROL_PREFIX:
                        self._reject("publisher sent a reserved control topic", frames[0])
                        continue
                    if self.permissions is not None and not self._may("publish", who, frames[0]):
                        continue
                    stats.messages_out += 1  # before the send, so a subscriber that has it never sees a count without it
                    send_frames(xpub, frames)
            if xpub in ready:
                for _ in range(_BATCH):
                    try:
                        frames, who = self._receive(xpub)
                    except zmq.Again:
                        break
                    self._on_subscription(frames[0], xsub, xpub, who)
            if peers is not None and peers.socket in ready:
                peers.drain()
            if on_tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick
                on_tick(self)

    def _receive(self, sock: zmq.Socket) -> tuple[list[bytes], str | None]:
        """One message and, when permissions apply, the name of the key that sent it."""
        if self.permissions is None:
            return recv_frames(sock, zmq.NOBLOCK), None
        return recv_frames_with_user(sock, zmq.NOBLOCK)

    def _may(self, action: str, who: str | None, topic: bytes) -> bool:
        """Whether key `who` may publish to / subscribe to `topic` now (a revoked key may do nothing)."""
        assert self.permissions is not None and self.options.curve is not None and self.options.curve.allow is not None
        text = topic.decode("utf-8", "replace")
        allowed = who in self.options.curve.allow.names() and (
            self.permissions.may_publish(who, text) if action == "publish" else self.permissions.may_subscribe(who, text))
        if not allowed:
            if action == "publish":
                self.stats.denied_publish += 1
            else:
                self.stats.denied_subscribe += 1
            self._bad_log.warning(f"denied|{action}|{who}|{text[:40]}", "forwarder denied key %s to %s %r",
                                  who, action, text[:80])
        return allowed

    def _on_subscription(self, msg: bytes, xsub: zmq.Socket, xpub: zmq.Socket, who: str | None = None) -> None:
        if not msg or msg[0] not in (0, 1):
            self._reject("subscriber sent a message that is not a subscription", msg)
            return
        subscribe, topic = msg[0] == 1, msg[1:]
        manual = self.permissions is not None
        if topic[:1] == codec.CONTROL_PREFIX:
            if topic.startswith(codec.PROBE_PREFIX):
                if manual:
                    xpub.setsockopt(zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE, topic)
                if subscribe:
                    self.stats.probes += 1
                    xpub.send(topic)
            else:
                self._reject("subscription to a reserved control topic", topic)
            return
        if manual:
            key = (who, topic)
            if not subscribe and self._denied_subs.get(key):
                self._denied_subs[key] -= 1
                return
            if subscribe and not self._may("subscribe", who, topic):
                self._denied_subs[key] = self._denied_subs.get(key, 0) + 1
                return
            xpub.setsockopt(zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE, topic)
        old = self._counts.get(topic, 0)
        if subscribe:
            new = old + 1
            self.stats.subscribe_events += 1
        else:
            if old == 0:
                return
            new = old - 1
            self.stats.unsubscribe_events += 1
        self.stats.subscriptions += new - old
        if new:
            self._counts[topic] = new
        else:
            del self._counts[topic]
        xsub.send(msg)
        if new:
            xsub.send(b"\x01" + codec.count_entry(topic, new))
        if old:
            xsub.send(b"\x00" + codec.count_entry(topic, old))

    def _reject(self, why: str, sample: bytes) -> None:
        self.stats.rejected += 1
        self._bad_log.warning(why, "forwarder rejected input: %s (%r)", why, sample[:40])

    # ---- thread launcher -------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> Forwarder:
        """Run in a daemon thread; returns once bound (re-raises a bind failure)."""
        if self._thread is not None:
            raise FabricError("this forwarder is already started (`with Forwarder(...)` starts it too)")
        self._thread = threading.Thread(target=self._run_quietly, name="zfabric-forwarder", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise FabricError(f"forwarder did not bind within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException:  # kept in self._error for start() to re-raise
            pass

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to end; joins the thread when start() made one, for at most `timeout` s (default: the
        linger, which subscribers get to take what was forwarded, and 2 s more)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.options.linger_ms / 1000 + 2.0 if timeout is None else timeout)

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ForwarderProcess(ChildProcess):
    """Launcher: runs `zfabric forwarder` as a child process and learns its addresses."""

    READY = re.compile(r"^zfabric forwarder ready xsub=(\S+) xpub=(\S+)")
    what = "forwarder process"

    def __init__(self, xsub: str = "tcp://127.0.0.1:0", xpub: str = "tcp://127.0.0.1:0",
                 *, extra_args: Sequence[str] = (), ready_timeout: float = 15.0) -> None:
        super().__init__(["forwarder", "--xsub", xsub, "--xpub", xpub, "--no-live", *extra_args],
                         ready_timeout=ready_timeout)
        self.xsub_endpoint = ""
        self.xpub_endpoint = ""

    def _on_ready(self, match: re.Match[str]) -> None:
        self.xsub_endpoint, self.xpub_endpoint = match.groups()
