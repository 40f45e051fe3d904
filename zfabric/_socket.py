"""The one place that builds and configures ZeroMQ sockets and contexts.

Patterns speak in endpoints, options and envelopes; they ask this module for a socket.
`zmq.ZMQError` from construction, options, bind and connect becomes `TransportError` here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar

import zmq
import zmq.asyncio

from .endpoint import Endpoint
from .errors import ClosedError, ConfigError, TransportError
from .options import DEFAULT_OPTIONS, SocketOptions

log = logging.getLogger("zfabric")

AnyContext = zmq.Context | zmq.asyncio.Context


def context_for(context: AnyContext | None, asyncio: bool) -> tuple[zmq.Context, bool]:
    """A context of the right face for a socket owner, and whether the owner made it.

    A sync context passed to an asyncio object (or the reverse) is shadowed, not copied,
    so both faces can share one context and its I/O thread.
    """
    if context is None:
        return (zmq.asyncio.Context() if asyncio else zmq.Context()), True
    if not isinstance(context, zmq.Context):
        raise ConfigError(f"context must be a zmq.Context, got {type(context).__name__}")
    if asyncio and not isinstance(context, zmq.asyncio.Context):
        return zmq.asyncio.Context.shadow(context.underlying), False
    if not asyncio and isinstance(context, zmq.asyncio.Context):
        return zmq.Context.shadow(context.underlying), False
    return context, False


# zfabric never turns on ZMTP heartbeats (ZMQ_HEARTBEAT_IVL); TCP keepalive, which carries no data, notices dead
# hosts instead. Measured with libzmq 4.3.5, heartbeats cost messages and crashes:
# - A ping (or its pong) that reaches a peer which has just closed its end makes Linux answer with a TCP reset,
#   and the reset throws away everything still in flight: a producer that sent a burst and exited lost
#   20,000-48,000 of 60,000 messages to a lagging consumer (tests/test_queue.py).
# - A socket whose queue is full stops reading its connection; if the peer then goes away, heartbeats make
#   libzmq abort the whole process (`Assertion failed: !_io_error`, libzmq#4364, open): a busy replier
#   died every time its client left (tests/test_reqrep.py). The request, scatter and sidecar protocols
#   have deadlines and leases of their own, so pings add nothing there that is worth that.


def _keepalive(sock: zmq.Socket, options: SocketOptions) -> None:
    """TCP keepalive probes every heartbeat interval while a connection is idle; a peer whose host answers none
    for heartbeat_timeout_ms is dropped. (Not TCP_MAXRT: that also drops a frozen peer, with all it holds.)"""
    every = max(1, round(options.heartbeat_ivl_ms / 1000))
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, every)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, every)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, max(1, options.heartbeat_timeout_ms // (every * 1000)))


def open_socket(
    context: zmq.Context,
    socket_type: int,
    endpoints: Sequence[Endpoint],
    options: SocketOptions = DEFAULT_OPTIONS,
    *,
    tune: Mapping[int, Any] | None = None,
    routing_ids: Sequence[bytes | None] | None = None,
    before_connect: Callable[[Any], None] | None = None,
) -> tuple[zmq.Socket, list[str]]:
    """A configured socket bound or connected to each endpoint, and the addresses it actually has.

    `tune` holds pattern-specific options (IMMEDIATE, ROUTER_MANDATORY, ...); `routing_ids`
    gives, per endpoint, the routing id a ROUTER uses for that connection; `before_connect`
    runs on the configured socket before any bind or connect (a monitor attached later
    would miss the first handshakes).
    """
    try:
        sock = context.socket(socket_type)
    except zmq.ZMQError as exc:
        raise TransportError(f"cannot create socket: {exc.strerror}", errno=exc.errno) from exc
    current: Endpoint | None = None
    try:
        sock.setsockopt(zmq.LINGER, options.linger_ms)
        sock.setsockopt(zmq.SNDHWM, options.send_hwm)
        sock.setsockopt(zmq.RCVHWM, options.receive_hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
        sock.setsockopt(zmq.RECONNECT_IVL, options.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, options.reconnect_ivl_max_ms)
        if options.heartbeat_ivl_ms:
            _keepalive(sock, options)
        for opt, value in (tune or {}).items():
            sock.setsockopt(opt, value)
        if options.curve is not None:
            _secure(sock, context, endpoints, options.curve, watch=before_connect is None)
        if before_connect is not None:
            before_connect(sock)
        actual: list[str] = []
        for i, ep in enumerate(endpoints):
            current = ep
            if routing_ids is not None and routing_ids[i] is not None:
                sock.setsockopt(zmq.CONNECT_ROUTING_ID, routing_ids[i])
            if ep.bind:
                sock.bind(ep.address)
                actual.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            else:
                sock.connect(ep.address)
                actual.append(ep.address)
        return sock, actual
    except BaseException as exc:
        sock.close(0)  # an open socket would make the context's term() hang
        if not isinstance(exc, zmq.ZMQError):
            raise
        where = current.address if current else None
        verb = "bind" if current and current.bind else "connect" if current else "configure socket"
        raise TransportError(f"cannot {verb}: {exc.strerror}", endpoint=where, errno=exc.errno) from exc


def _secure(sock: zmq.Socket, context: zmq.Context, endpoints: Sequence[Endpoint], curve: Any, *, watch: bool) -> None:
    """Make `sock` a CURVE server (it binds; only allowed keys get in) or client (it connects).

    A server's failed handshakes are counted and logged by the context's authenticator,
    unless the socket has a monitor of its own (`watch=False`; a socket has one monitor).
    """
    from .security.zap import ensure_zap, handler_for

    sides = {ep.bind for ep in endpoints}
    if len(sides) > 1:
        raise ConfigError("a CURVE socket either binds (a server) or connects (a client), not both")
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.keypair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.keypair.public)
    if True in sides:
        if curve.allow is None:
            raise ConfigError("a CURVE server socket needs an allowlist: who may connect (Curve(allow=...))")
        sock.setsockopt(zmq.ZAP_DOMAIN, ensure_zap(context, curve.allow).encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        handler = handler_for(context)
        if watch and handler is not None:
            handler.watch(sock, ", ".join(ep.address for ep in endpoints))
    else:
        if curve.server_key is None:
            raise ConfigError("a CURVE client socket needs the server's public key (Curve(server_key=...))")
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)


def warn_exposed(who: str, endpoints: Sequence[Endpoint], *, encrypted: bool = False) -> None:
    """Warn about each endpoint reachable beyond this host when its traffic travels unencrypted."""
    if encrypted:
        return
    for ep in endpoints:
        if not ep.is_loopback:
            log.warning("%s: %s is reachable beyond this host and traffic is not encrypted", who, ep.address)


_SNDMORE = int(zmq.SNDMORE)
_WITH_MORE = {0: _SNDMORE, int(zmq.NOBLOCK): _SNDMORE | int(zmq.NOBLOCK)}
"""Plain ints: OR-ing pyzmq's IntFlag constants runs enum code on every frame."""
ZERO_COPY_MIN = 65536
"""Frames at least this large are handed to libzmq without a copy."""


SEND: Callable[..., Any] = zmq.backend.Socket.send
"""pyzmq's compiled send, called without the Python wrapper `zmq.Socket.send` puts around it (for
DRAFT routing ids and groups, which zfabric never uses): 0.17 us a frame instead of 0.56. Sync sockets only."""
RECV: Callable[..., Any] = zmq.backend.Socket.recv
"""pyzmq's compiled recv, looked up once (sync sockets only)."""


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message from a sync socket, one C-level call per frame.

    pyzmq's send_multipart checks and loops in Python and costs over twice as much for the
    one to three frames zfabric sends. libzmq queues a multipart message atomically: an
    EAGAIN can only come on the first frame, and then nothing was sent.
    """
    if len(frames) > 1:
        more = _WITH_MORE.get(flags) or (int(flags) | _SNDMORE)
        for frame in frames[:-1]:
            SEND(sock, frame, more)
    last = frames[-1]
    SEND(sock, last, flags, len(last) < ZERO_COPY_MIN)


def send_routed(sock: zmq.Socket[Any], route: bytes, frames: Sequence[Any], flags: int = 0) -> None:
    """Send `[route, *frames]` from a sync ROUTER: `send_frames` without building the list, and for the commonest
    message (one frame after the route) two compiled sends. A ROUTER refuses a message on its first frame (an
    unknown or full peer), or takes it all."""
    if len(frames) == 1:
        last = frames[0]
        SEND(sock, route, _WITH_MORE.get(flags) or (int(flags) | _SNDMORE))
        SEND(sock, last, flags, len(last) < ZERO_COPY_MIN)
    else:
        send_frames(sock, [route, *frames], flags)


_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_zmq_poll = zmq.zmq_poll
WAIT_MS_MAX = (1 << 31) - 1
"""The longest wait ZeroMQ takes in one call (its timeouts are C ints): about 24.8 days."""


def wait_ms(seconds: float) -> int:
    """Milliseconds for a poll or receive timeout of `seconds`, rounded up so a wait never ends early and spins;
    0 once passed. Capped at WAIT_MS_MAX, so a huge or infinite timeout waits long instead of overflowing."""
    if seconds <= 0:
        return 0
    return int(seconds * 1000) + 1 if seconds < 2_000_000 else WAIT_MS_MAX


def readable(sock: zmq.Socket[Any], timeout_ms: int) -> bool:
    """Whether a message can be received from a sync socket within `timeout_ms` (-1: forever).

    One `zmq_poll`, which looks at the socket's own event flags before it waits: about 1 us when a message is
    waiting, where pyzmq's `getsockopt(EVENTS)` alone costs 2.5 us and Socket.poll builds a Poller on every call.
    """
    return bool(_zmq_poll([(sock, _POLLIN)], timeout_ms))


def has_message(sock: zmq.Socket[Any]) -> bool:
    """Whether a message is waiting on a sync socket right now (no exception when not, unlike a NOBLOCK recv)."""
    return bool(_zmq_poll([(sock, _POLLIN)], 0))


def waiting(sock: zmq.Socket[Any], limit: int = 1 << 62, receive: Callable[..., Any] | None = None) -> Iterator[Any]:
    """The messages waiting on a sync socket now, at most `limit`, each as `receive(sock, NOBLOCK)` returns it
    (default: recv_frames). A poll first (about 1 us) finds an empty socket without the exception a receive that
    finds nothing raises (about 4 us); a drain that took messages ends on that exception, one per drain."""
    if limit <= 0 or not _zmq_poll([(sock, _POLLIN)], 0):
        return
    get = recv_frames if receive is None else receive
    for _ in range(limit):
        try:
            yield get(sock, _NOBLOCK)
        except zmq.Again:
            return


def recv_frames(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """Receive one multipart message on a sync socket, reading the more-flag from each frame."""
    frame = RECV(sock, flags, False)
    frames = [frame.bytes]
    while frame.more:
        frame = RECV(sock, 0, False)
        frames.append(frame.bytes)
    return frames


async def next_frames(sock: Any, shadow: zmq.Socket[Any]) -> list[bytes]:
    """The next message on an asyncio socket: taken at once through its sync `shadow` when one is waiting,
    else awaited (a receive future costs less than a poll, and brings the message)."""
    try:
        return recv_frames(shadow, _NOBLOCK)
    except zmq.Again:
        return await sock.recv_multipart()  # type: ignore[no-any-return]


def rearm(sock: Any) -> None:
    """Make pyzmq look at an asyncio socket again after I/O through its sync shadow.

    libzmq signals arrivals on an edge, and a send or receive through the shadow can consume the
    edge that a poll or receive awaited on the asyncio socket (in another task) is waiting for; that
    task would then sleep until the next arrival. Reading EVENTS through the asyncio socket makes
    pyzmq re-check and wake it, as pyzmq's own asyncio send does.
    """
    sock.get(zmq.EVENTS)


def recv_frames_first(sock: zmq.Socket[Any], flags: int = 0) -> tuple[list[bytes], zmq.Frame]:
    """One message, and its first frame, whose properties say who sent it (see `peer_of`)."""
    first = RECV(sock, flags, False)
    return recv_rest(sock, first), first


def recv_rest(sock: zmq.Socket[Any], first: zmq.Frame) -> list[bytes]:
    """The bytes of every frame of the message that `first` (already received) starts."""
    frames = [first.bytes]
    frame = first
    while frame.more:
        frame = RECV(sock, 0, False)
        frames.append(frame.bytes)
    return frames


def user_of(frame: zmq.Frame) -> str | None:
    """The name the sender's CURVE key was accepted under (User-Id), or None without CURVE."""
    try:
        who = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return who if isinstance(who, str) and who else None


def peer_of(frame: zmq.Frame | None) -> str:
    """Who sent a message, for counting and logs: its key's name with CURVE, else its IP address, else "?"."""
    if frame is None:
        return "?"
    who = user_of(frame)
    if who is not None:
        return f"key {who}"
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return "?"
    return str(address) if address else "local peer"


def recv_frames_with_user(sock: zmq.Socket[Any], flags: int = 0) -> tuple[list[bytes], str | None]:
    """One message and the name its sender's CURVE key was accepted under (User-Id), or None without CURVE."""
    frames, first = recv_frames_first(sock, flags)
    return frames, user_of(first)


class SocketOwner:
    """Base of every pattern object: owns one socket and, if it made it, the context.

    Subclasses name the socket type and tuning; the asyncio faces set `_asyncio = True`
    and get a zmq.asyncio socket from the same code.
    """

    _asyncio: ClassVar[bool] = False
    _socket_type: ClassVar[int]
    _tune: ClassVar[Mapping[int, Any]] = {}
    _watch_peers: ClassVar[bool] = False
    """Subclasses that wait for peers set this; `_peers` then counts them from the first handshake."""
    _hand_over: ClassVar[bool] = False
    """Senders whose close() waits, over ipc, until each peer has read what was sent (`wait_handed_over`)."""
    _sends_data: ClassVar[bool] = True
    """False where all this socket sends is control traffic (a SUB's subscriptions): close() then does not linger,
    since flushing it to a peer that is gone would only delay the close and warn of nothing lost."""
    _sock: Any
    """A zmq.Socket or a zmq.asyncio.Socket, by face; the I/O methods of each face know which."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
        routing_ids: Sequence[bytes | None] | None = None,
        tune: Mapping[int, Any] | None = None,
    ) -> None:
        self.options = options if options is not None else DEFAULT_OPTIONS
        self._ctx, self._owns_ctx = context_for(context, self._asyncio)
        self._closed = False
        self._endpoint_specs = list(endpoints)
        self._peers: PeerWatch | None = None
        over_ipc = any(spec.address.startswith("ipc://") for spec in self._endpoint_specs)
        self._hands_over = self._hand_over and over_ipc
        # A CURVE server's one monitor may belong to the authenticator, which counts failed handshakes.
        watch = self._watch_peers or (self._hands_over and self.options.curve is None)
        try:
            self._sock, self.endpoints = open_socket(
                self._ctx,
                self._socket_type,
                self._endpoint_specs,
                self.options,
                tune={**self._tune, **(tune or {})},
                routing_ids=routing_ids,
                before_connect=self._attach_peer_watch if watch else None,
            )
        except BaseException:
            if self._peers is not None:
                self._peers.close()
            if self._owns_ctx:
                self._ctx.term()
            raise
        self._who = f"{type(self).__name__} on {self.endpoint}"
        """How logs name this object; built once, not per message."""
        self._warn_exposed()

    @property
    def endpoint(self) -> str:
        """The first endpoint as actually bound or connected (a port 0 bind shows its real port)."""
        return self.endpoints[0]

    @property
    def closed(self) -> bool:
        """True once close() ran."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _warn_exposed(self) -> None:
        warn_exposed(type(self).__name__, self._endpoint_specs, encrypted=self.options.curve is not None)

    _shadow: zmq.Socket[Any] | None = None

    @property
    def _sync_sock(self) -> zmq.Socket[Any]:
        """A sync socket on the same ZeroMQ socket (the socket itself in the sync face).

        The asyncio faces send and receive what the socket takes or holds right now through it,
        without an event loop round trip (about 15 us a message through zmq.asyncio), and await
        only when they must wait. Use it only from the thread that runs the loop.
        """
        if not self._asyncio:
            return self._sock  # type: ignore[no-any-return]
        sock = self._shadow
        if sock is None:
            sock = self._shadow = zmq.Socket.shadow(self._sock.underlying)
        return sock

    async def _asend(self, frames: Sequence[Any], timeout: float | None = None) -> None:
        """Send one message from the asyncio face: at once when the socket takes it, else awaited
        (at most `timeout` seconds: TimeoutError, and nothing was sent)."""
        try:
            send_frames(self._sync_sock, frames, _NOBLOCK)
        except zmq.Again:
            await asyncio.wait_for(self._sock.send_multipart(frames, copy=False), timeout)

    def _attach_peer_watch(self, sock: Any) -> None:
        self._peers = PeerWatch(sock)

    def _close_sockets(self, linger_ms: int) -> None:
        close_handing_over(self._sock, self._peers, linger_ms, hand_over=self._hands_over)

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket, waiting at most `linger_ms` (default: the options', or 0 for a subscriber) to flush.

        Messages still queued when that time is up are dropped by ZeroMQ, silently; when this object owns its
        context, a close that took the whole linger logs a warning saying so.
        """
        if self._closed:
            return
        self._closed = True
        if linger_ms is None:
            linger = self.options.linger_ms if self._sends_data else 0
        else:
            linger = linger_ms
        started = time.monotonic()
        self._close_sockets(linger)
        if self._owns_ctx:
            self._ctx.term()  # returns once everything queued is sent, or the linger is up
            if linger > 0 and time.monotonic() - started >= linger / 1000 * 0.95:
                log.warning("%s closed after its whole linger of %d ms: messages still queued then were dropped "
                            "(a peer that is slow or gone); raise SocketOptions.linger_ms to wait longer",
                            self._who, linger)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ", ".join(self.endpoints)
        return f"<{type(self).__name__} {state}>"


def unsent_bytes(fd: int) -> int:
    """Bytes written to a connection that its peer has not read yet (a unix socket's send queue), 0 if unknown."""
    try:
        import array
        import fcntl
        import termios

        buf = array.array("i", [0])
        fcntl.ioctl(fd, termios.TIOCOUTQ, buf)
    except (ImportError, OSError):  # not a POSIX system, or the connection is gone
        return 0
    return buf[0]


def close_handing_over(sock: Any, peers: PeerWatch | None, linger_ms: int, *, hand_over: bool = True) -> None:
    """Close `sock`, flushing for at most `linger_ms`. With `hand_over` and a watch on its `peers` (over ipc), first
    wait until each peer has read what the kernel holds for it: libzmq drops that for a peer whose queue is full
    when this side hangs up, and a unix socket hangs up at once (libzmq#4660)."""
    if peers is not None:
        if hand_over and linger_ms > 0:
            started = time.monotonic()
            peers.drain()
            wait_handed_over(peers.fds, started + linger_ms / 1000)
            linger_ms = max(0, linger_ms - int((time.monotonic() - started) * 1000))
        peers.close()
    sock.close(linger_ms)


def wait_handed_over(fds: Iterable[int], deadline: float) -> None:
    """Until the peers of unix-socket connections `fds` have read everything sent on them, at most until
    `deadline` (monotonic). The kernel exposes no event for it, so this polls its counter every 2 ms; two
    empty readings 5 ms apart also mean libzmq had nothing left to write."""
    fds = list(fds)
    empty_since: float | None = None
    while True:
        now = time.monotonic()
        if any(unsent_bytes(fd) for fd in fds):
            empty_since = None
        elif empty_since is None:
            empty_since = now
        elif now - empty_since >= 0.005:
            return
        if now >= deadline:
            return
        time.sleep(0.002)


_monitor_ids = itertools.count()


def monitor_address(purpose: str) -> str:
    """An inproc address for a socket monitor that no other socket of the process uses.

    pyzmq's default names a monitor after the socket's file descriptor, which a socket opened
    just after another closed can inherit while the old monitor's address is still bound: the
    new socket then fails with "Address already in use".
    """
    return f"inproc://zfabric-{purpose}-{next(_monitor_ids)}"


class PeerWatch:
    """Counts a socket's live peers from its monitor events (handshake done minus disconnected),
    and keeps their connections' descriptors.

    Lets a sender wait until N peers are connected before a burst, instead of sleeping and
    hoping (the first peer to connect would otherwise take the whole burst), and, over ipc,
    wait at close until they have read what was sent (`wait_handed_over`).
    """

    EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED

    def __init__(self, sock: zmq.Socket) -> None:
        self._monitor = sock.get_monitor_socket(self.EVENTS, monitor_address("peers"))
        self._monitor.setsockopt(zmq.RCVHWM, 0)
        self._drain_sock: zmq.Socket[bytes] = zmq.Socket.shadow(self._monitor.underlying)
        self.peers = 0
        self.fds: set[int] = set()
        """The file descriptors of the open connections (libzmq's, in this process)."""

    def drain(self) -> int:
        """Apply every pending monitor event; returns the live peer count."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                msg = self._drain_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self.peers
            parsed = parse_monitor_message(msg)
            event = parsed["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.peers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.peers = max(0, self.peers - 1)
                self.fds.discard(parsed["value"])
            else:  # CONNECTED or ACCEPTED
                self.fds.add(parsed["value"])

    @property
    def socket(self) -> Any:
        """The monitor socket (sync or asyncio, like the watched one), for polling in either face."""
        return self._monitor

    def close(self) -> None:
        """Close the monitor socket (call before the watched socket closes)."""
        self._monitor.close(0)
