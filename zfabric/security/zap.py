"""Who may connect: an allowlist of public keys, and the ZAP handler that enforces it for every CURVE server socket.

ZeroMQ fails open: a CURVE server socket whose context has no ZAP handler accepts any
client key. So a zfabric CURVE server never binds without `ensure_zap()` first: it starts
(once per context) a handler thread on `inproc://zeromq.zap.01`, checks that it answers and
refuses an unknown key, and only then lets the socket bind. The handler accepts CURVE
only, names each accepted client by its key's name (the message property `User-Id`), and
counts and logs refusals, at most once per key per interval.

An allowlist backed by a directory re-reads it when the directory changes (checked at
most once a second), so adding or removing a key file takes effect without a restart for
every new connection.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .._logs import Throttled
from .._socket import monitor_address
from ..errors import ConfigError
from .keys import PUBLIC_SUFFIX, KeyPair, load_public

log = logging.getLogger("zfabric.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_WATCHED = _HANDSHAKE_FAILED | zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
_SELF_CHECK = b"zfabric-self-check"
"""Request id of the start-up probe (answered like any request, but not counted or logged)."""


class Allowlist:
    """Public keys allowed to connect, each with a name: a directory of NAME.key files, or given keys."""

    def __init__(self, source: str | os.PathLike[str] | Iterable[KeyPair], *, only: Iterable[str] | None = None,
                 refresh: float = 1.0) -> None:
        self.refresh = refresh
        self.only = None if only is None else frozenset(only)
        """With a directory: only these key names are allowed, even if other key files are there."""
        self._dir: Path | None = None
        self._keys: dict[bytes, str] = {}
        self._names: frozenset[str] = frozenset()
        self._stamp: tuple[int, ...] = ()
        self._checked = 0.0
        self._lock = threading.Lock()
        if isinstance(source, (str, os.PathLike)):
            self._dir = Path(source)
            if not self._dir.is_dir():
                raise ConfigError(f"allowlist {self._dir}: not a directory of public key files (NAME{PUBLIC_SUFFIX})")
            self._reload(force=True)
        else:
            self._keys = {k.public: k.name for k in source if self.only is None or k.name in self.only}
        self._names = frozenset(self._keys.values())

    @property
    def source(self) -> str:
        return str(self._dir) if self._dir is not None else f"{len(self._keys)} given key(s)"

    def _reload(self, force: bool = False) -> None:
        import time

        assert self._dir is not None
        now = time.monotonic()
        if not force and now - self._checked < self.refresh:
            return
        self._checked = now
        try:
            files = sorted(p for p in self._dir.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
            stamp = (self._dir.stat().st_mtime_ns, *(p.stat().st_mtime_ns for p in files))
        except OSError as exc:
            log.error("allowlist %s unreadable (%s): allowing nobody until it is back", self._dir, exc.strerror)
            self._keys, self._stamp, self._names = {}, (), frozenset()
            return
        if stamp == self._stamp and not force:
            return
        keys: dict[bytes, str] = {}
        for path in files:
            try:
                pair = load_public(path)
            except ConfigError as exc:
                log.warning("allowlist: skipped %s", exc)
                continue
            if self.only is None or pair.name in self.only:
                keys[pair.public] = pair.name
        self._keys, self._stamp = keys, stamp
        self._names = frozenset(keys.values())

    def name_of(self, public_z85: bytes) -> str | None:
        """The name of an allowed key, or None; a directory is re-read when it changed."""
        with self._lock:
            if self._dir is not None:
                self._reload()
            return self._keys.get(public_z85)

    def names(self) -> frozenset[str]:
        """The names allowed right now (a directory is re-read when it changed)."""
        with self._lock:
            if self._dir is not None:
                self._reload()
            return self._names


@dataclass
class ZapCounters:
    """What the authenticator of one context has decided."""

    accepted: int = 0
    denied: int = 0
    malformed: int = 0
    handshake_failures: int = 0


class ZapHandler:
    """The ZAP handler of one context: answers libzmq's authentication requests for every domain it serves."""

    def __init__(self, context: zmq.Context) -> None:
        self.context = context
        self.domains: dict[str, Allowlist] = {}
        self.stats = ZapCounters()
        self._denied_log = Throttled(log, interval=10.0)
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zfabric-zap", daemon=True)
        self._watch_queue: list[tuple[zmq.Socket, str]] = []
        self._tally: dict[zmq.Socket, list[int]] = {}

    def start(self) -> ZapHandler:
        self._thread.start()
        self._bound.wait(5)
        if self._error is not None:
            raise ConfigError(f"cannot start the authenticator: {self._error}") from None
        return self

    def _run(self) -> None:
        sock = None
        try:
            sock = zmq.Socket(self.context, zmq.REP)
            sock.linger = 0
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._bound.set()
            if sock is not None:
                sock.close(0)
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        monitors: dict[zmq.Socket, str] = {}
        try:
            while True:
                while self._watch_queue:
                    with _registry_lock:
                        mon, where = self._watch_queue.pop()
                    poller.register(mon, zmq.POLLIN)
                    monitors[mon] = where
                for ready, _ in poller.poll(100):
                    if ready is sock:
                        sock.send_multipart(self.answer(sock.recv_multipart()))
                    elif not self._handshake_event(ready, monitors[ready]):
                        poller.unregister(ready)
                        del monitors[ready]
                        ready.close(0)
        except zmq.ContextTerminated:
            return
        finally:
            for mon in monitors:
                mon.close(0)
            sock.close(0)
            _forget(self.context)

    def watch(self, server: zmq.Socket, where: str) -> None:
        """Count and log failed handshakes on a CURVE server socket (no key, garbage, a refused key)."""
        address = monitor_address("handshakes")
        server.monitor(address, _WATCHED)
        # Connected here, before the server binds, so no event is lost; the handler thread takes the
        # socket over through the queue (a lock-protected hand-over is the memory barrier libzmq asks for).
        mon = zmq.Socket(self.context, zmq.PAIR)
        mon.linger = 0
        mon.connect(address)
        with _registry_lock:
            self._watch_queue.append((mon, where))

    def _handshake_event(self, mon: zmq.Socket, where: str) -> bool:
        """Handle one monitor event; False once the watched socket has closed.

        A connection that closes before any handshake outcome (raw bytes that are not ZMTP,
        a port scanner) produces no handshake event; it is found by counting: more accepted
        connections than handshake outcomes when one disconnects.
        """
        event = parse_monitor_message(mon.recv_multipart())
        kind_of = int(event["event"])
        if kind_of == zmq.EVENT_MONITOR_STOPPED:
            self._tally.pop(mon, None)
            return False
        tally = self._tally.setdefault(mon, [0, 0, 0])  # accepted, settled, closed early
        if kind_of == zmq.EVENT_ACCEPTED:
            tally[0] += 1
            return True
        if kind_of == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            tally[1] += 1
            return True
        if kind_of == zmq.EVENT_DISCONNECTED:
            if tally[0] <= tally[1] + tally[2]:
                return True
            tally[2] += 1
            kind = "closed before a handshake (not ZeroMQ, or garbage)"
        else:
            tally[1] += 1
            kind = {int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "refused by the authenticator",
                    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "not a CURVE handshake (no key, or not ZeroMQ)"}.get(
                        kind_of, "failed before authentication (no key, or not ZeroMQ)")
        self.stats.handshake_failures += 1
        endpoint = event.get("endpoint", b"")
        where = (endpoint.decode("utf-8", "replace") if isinstance(endpoint, bytes) else str(endpoint)) or where
        self._denied_log.warning(f"handshake|{where}|{kind}", "handshake on %s %s", where, kind)
        return True

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request (RFC 27): 200 with the key's name, or 400 with a reason."""
        if len(request) < 6 or request[0] != _ZAP_VERSION:
            self.stats.malformed += 1
            request_id = request[1] if len(request) > 1 else b""
            return [_ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        _, request_id, domain, address, _identity, mechanism, *credentials = request
        allow = self.domains.get(domain.decode("utf-8", "replace"))
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32 or allow is None:
            reason = "not CURVE" if mechanism != b"CURVE" else "unknown domain" if allow is None else "bad credentials"
            return self._deny(request_id, address, mechanism.decode("ascii", "replace"), reason)
        key = z85.encode(credentials[0])
        name = allow.name_of(key)
        if name is None:
            return self._deny(request_id, address, key[:8].decode(), "key not in the allowlist")
        if request_id != _SELF_CHECK:
            self.stats.accepted += 1
        return [_ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""]

    def _deny(self, request_id: bytes, address: bytes, who: str, reason: str) -> list[bytes]:
        if request_id != _SELF_CHECK:
            self.stats.denied += 1
            peer = address.decode("utf-8", "replace") or "?"
            self._denied_log.warning(f"{who}|{peer}", "refused a connection from %s (key %s): %s", peer, who, reason)
        return [_ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]


_handlers: dict[int, ZapHandler] = {}
_registry_lock = threading.Lock()


def _forget(context: zmq.Context) -> None:
    with _registry_lock:
        _handlers.pop(context.underlying, None)


def handler_for(context: zmq.Context) -> ZapHandler | None:
    """The running ZAP handler of `context`, if zfabric started one."""
    with _registry_lock:
        return _handlers.get(context.underlying)


def ensure_zap(context: zmq.Context, allow: Allowlist) -> str:
    """Make sure `context` has a running ZAP handler that serves `allow`; returns the ZAP domain to set on the socket.

    Fails closed: raises ConfigError unless the handler answers a probe with an unknown key by refusing it.
    """
    underlying = context.underlying
    domain = f"zfabric-{id(allow):x}"
    with _registry_lock:
        handler = _handlers.get(underlying)
        if handler is None:
            handler = ZapHandler(zmq.Context.shadow(underlying)).start()
            _handlers[underlying] = handler
        handler.domains[domain] = allow
    _self_check(context, domain)
    return domain


def _self_check(context: zmq.Context, domain: str) -> None:
    """Ask the handler about a key nobody has: anything but a refusal means an open door, so refuse to go on."""
    probe = zmq.Socket(zmq.Context.shadow(context.underlying), zmq.REQ)
    probe.linger = 0
    try:
        probe.connect(ZAP_ENDPOINT)
        unknown = z85.decode(zmq.curve_keypair()[0])
        probe.send_multipart([_ZAP_VERSION, _SELF_CHECK, domain.encode(), b"", b"", b"CURVE", unknown])
        if not probe.poll(2000):
            raise ConfigError("refusing to start a CURVE server: the authenticator did not answer its self-check")
        reply = probe.recv_multipart()
        if len(reply) < 3 or reply[2] != b"400":
            raise ConfigError("refusing to start a CURVE server: the authenticator accepted an unknown key")
    finally:
        probe.close(0)


def zap_stats(context: zmq.Context) -> Mapping[str, int]:
    """The handler's counters for this context (empty when it has none)."""
    handler = _handlers.get(context.underlying)
    return {} if handler is None else dict(vars(handler.stats))
