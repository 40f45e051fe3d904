"""The sidecar: owns one service's reliable queues, confirms what it stored, leases messages to workers.

One loop, in the thread that runs it, owns the ROUTER socket and the SQLite connection.
Each pass reads what arrived, updates the ledger, writes every change in one transaction,
and only after the commit sends confirms and deliveries: nothing is confirmed before it
is durable, and no attempt is handed out before it is counted.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq

from .. import codec
from .._logs import Throttled
from .._process import ChildProcess
from .._socket import (
    open_socket,
    readable,
    recv_frames_with_user,
    send_frames,
    waiting,
    warn_exposed,
)
from ..endpoint import Endpoint
from ..envelope import Envelope
from ..errors import ConfigError, DecodeError, FabricError
from ..options import DEFAULT_OPTIONS, SocketOptions
from ..security.permissions import Permissions
from . import protocol as p
from .config import DEFAULT_SIDECAR_ENDPOINT, SidecarConfig
from .ledger import Lease, Ledger
from .store import DeadLetterFilter, Entry, Store, StoreLock

log = logging.getLogger("zfabric.sidecar")
_bad = Throttled(log)

DRAIN_LIMIT = 2000
"""Messages read per pass at most, so one pass (and one commit) stays short."""
MAX_WAIT = 0.1
"""Longest poll, so stop() and lease checks are timely."""
PURGE_EVERY = 5.0
DELIVERY_BATCH = 50
"""Messages per DLV message to one worker at most."""
_NOBLOCK = int(zmq.NOBLOCK)
COUNTS_MAX_AGE = 1.0
"""A stats request recounts the store's rows at most this often (a count scans the table)."""


class Sidecar:
    """The reliable-queue sidecar; `run()` in any thread, or `start()` for a thread of its own.

    Example:  Sidecar("orders.db", {"orders": RetryPolicy(max_attempts=5)}).start()
    """

    def __init__(
        self,
        store: str | Any = None,
        queues: Mapping[str, Any] | Sequence[str] | None = None,
        *,
        endpoint: str = DEFAULT_SIDECAR_ENDPOINT,
        config: SidecarConfig | None = None,
        options: SocketOptions | None = None,
        context: zmq.Context | None = None,
        permissions: Permissions | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            if store is None or queues is None:
                raise ConfigError("Sidecar: give a store path and the queues it owns, or a SidecarConfig")
            config = SidecarConfig(store=store, queues=queues, endpoint=endpoint, **settings)
        self.config = config
        self.options = options if options is not None else DEFAULT_OPTIONS
        if permissions is not None and self.options.curve is None:
            raise ConfigError("sidecar permissions need CURVE: a client's key is what identifies it")
        self.permissions = permissions
        """Which keys may send to and take from which queues; None: every key the allowlist lets in."""
        self._senders: list[str | None] = []
        self._who_sent: str | None = None
        self._ctx = context
        self.ledger = Ledger(config.policies, lease_timeout=config.lease_timeout, cache_limit=config.cache_limit)
        self.stats = self.ledger.stats
        self.endpoint = ""
        """The bound address (a port 0 bind shows its real port), set once the sidecar is ready."""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._store_counts: dict[str, int] = {}
        self._counted_at = 0.0
        self._fresh: list[Entry] = []
        """Messages received in the current pass, written at its end in their final state."""
        self._done: list[Entry] = []
        """The messages acknowledged in the current pass, written together at its end."""

    @classmethod
    def from_config(cls, config: SidecarConfig, **kwargs: Any) -> Sidecar:
        return cls(config=config, **kwargs)

    # -- launchers ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Sidecar:
        """Run in a daemon thread; returns once it is bound and has recovered its store (raises if it failed)."""
        self._thread = threading.Thread(target=self._run_quietly, name="zfabric-sidecar", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise FabricError(f"sidecar did not become ready within {timeout:g} s")
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # kept for start() to re-raise
            self._error = exc
            self._ready.set()
            log.error("sidecar stopped: %s", exc)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end (it finishes its pass and commits); joins the thread start() made."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop -------------------------------------------------------------------------

    def run(self, on_ready: Callable[[Sidecar], None] | None = None, on_tick: Callable[[Sidecar], None] | None = None,
            tick: float = 1.0) -> None:
        """Serve until stop(); builds its socket and opens its store in the calling thread."""
        cfg = self.config
        lock = StoreLock(cfg.store).acquire()
        ctx = self._ctx if self._ctx is not None else zmq.Context()
        store: Store | None = None
        sock: zmq.Socket | None = None
        try:
            store = Store(cfg.store, synchronous=cfg.synchronous)
            self._store = store
            self._recover(store)
            where = [Endpoint.parse(cfg.endpoint, default_bind=True)]
            sock, actual = open_socket(ctx, zmq.ROUTER, where, self.options, tune={zmq.ROUTER_MANDATORY: 1})
            warn_exposed("sidecar", where, encrypted=self.options.curve is not None)
            self.endpoint = actual[0]
            self._sock = sock
            log.info("sidecar ready endpoint=%s store=%s queues=%s", self.endpoint, cfg.store, ",".join(cfg.queues))
            self._ready.set()
            if on_ready is not None:
                on_ready(self)
            next_tick = time.monotonic() + tick
            next_purge = time.monotonic() + PURGE_EVERY
            while not self._stop.is_set():
                batch = self._read(sock)
                self._pass(store, sock, batch, purge=time.monotonic() >= next_purge)
                now = time.monotonic()
                if now >= next_purge:
                    next_purge = now + PURGE_EVERY
                if on_tick is not None and now >= next_tick:
                    next_tick = now + tick
                    on_tick(self)
        finally:
            if sock is not None:
                sock.close(self.options.linger_ms)
            if store is not None:
                store.close()
            if self._ctx is None:
                ctx.term()
            lock.release()

    def _recover(self, store: Store) -> None:
        store.begin()
        delayed = store.recover()
        store.commit()
        for due, entry in delayed:
            if entry.queue in self.ledger.books:
                self.ledger.delay(entry, due)
        for name in self.ledger.books:
            self.ledger.mark_spilled(name, 0)
        orphans = set(store.queue_names()) - set(self.ledger.books)
        if orphans:
            log.warning("store %s holds pending messages for queue(s) %s that this sidecar does not serve",
                        self.config.store, ", ".join(sorted(orphans)))
        self._store_counts = store.counts()

    def _wait_ms(self) -> int:
        wait = MAX_WAIT
        due = self.ledger.next_due()
        if due is not None:
            wait = min(wait, max(due - time.time(), 0.0))
        return int(wait * 1000) + 1

    def _read(self, sock: zmq.Socket) -> list[list[bytes]]:
        batch: list[list[bytes]] = []
        if not readable(sock, self._wait_ms()):
            return batch
        if self.permissions is None:
            batch.extend(waiting(sock, DRAIN_LIMIT))
            return batch
        self._senders.clear()
        for frames, who in waiting(sock, DRAIN_LIMIT, recv_frames_with_user):
            batch.append(frames)
            self._senders.append(who)
        return batch

    def _denied(self, who: str | None, what: str) -> str:
        self.ledger.stats.denied += 1
        reason = f"key {who} may not {what}"
        _bad.warning(f"denied|{who}|{what}", "sidecar %s: %s", self.endpoint, reason)
        return reason

    def _pass(self, store: Store, sock: zmq.Socket, batch: list[list[bytes]], *, purge: bool = False) -> None:
        now, mono = time.time(), time.monotonic()
        replies: list[list[Any]] = []
        confirms: dict[bytes, list[bytes]] = {}
        rejects: dict[bytes, list[list[Any]]] = {}
        led = self.ledger
        store.begin()
        try:
            senders = self._senders if self.permissions is not None else None
            for i, frames in enumerate(batch):
                self._who_sent = senders[i] if senders is not None and i < len(senders) else None
                try:
                    self._handle(store, frames, now, mono, replies, confirms, rejects)
                except DecodeError as exc:
                    led.stats.decode_errors += 1
                    peer = frames[0].hex() if frames else "?"
                    _bad.warning(f"sidecar:{peer}", "sidecar %s: bad message from peer %s: %s", self.endpoint, peer, exc)
            for lease in led.expired_leases(mono):
                self._lease_lost(store, lease, now)
            led.release_due(now)
            out, expired = led.deliveries(now)
            # New messages are written once, in their final state: a message that goes straight
            # out to a worker costs one INSERT, not an INSERT and an UPDATE.
            fresh, self._fresh = self._fresh, []
            if fresh:
                store.insert(fresh, now)
                fresh_seqs = {e.seq for e in fresh}
                delivered = [e for _, e in out if e.seq not in fresh_seqs]
            else:
                delivered = [e for _, e in out]
            # Written before paging: the store must no longer count them ready, or a page from an
            # earlier point (a replay moves it back) would load them again and deliver them twice.
            store.mark_delivered(delivered)
            paged = False
            for queue, from_seq, want in list(led.wants_page()):
                led.paged_in(queue, store.load_ready(queue, from_seq, want), want)
                paged = True
            if paged:
                more, late = led.deliveries(now)
                out += more
                expired += late
                store.mark_delivered(e for _, e in more)
            if self._done:
                store.mark_done(self._done, now)
                self._done.clear()
            for entry in expired:
                self._dead(store, entry, "expired", None, now)
            if purge:
                store.purge_done(now - self.config.dedupe_window)
                self._store_counts = store.counts()
            store.commit()
        except BaseException:
            self._fresh = []
            self._done.clear()
            store.rollback()
            raise
        # Durable from here on: confirm, answer, deliver.
        for route, ids in confirms.items():
            self._send(sock, [route, p.CONFIRM, p.pack(ids)])
            led.stats.confirmed += len(ids)
        for route, items in rejects.items():
            self._send(sock, [route, p.REJECT, p.pack(items)])
        for frames in replies:
            self._send(sock, frames)
        batches: dict[bytes, tuple[Lease, list[Any], list[int]]] = {}
        for lease, entry in out:
            _, dlv, size = batches.setdefault(lease.worker_id, (lease, [], [0]))
            dlv.extend((entry.attempts, entry.header, entry.body))
            size[0] += len(entry.header) + len(entry.body)
            if entry.attempts > 1:
                led.stats.redelivered += 1
            if len(dlv) >= 3 * DELIVERY_BATCH or size[0] >= p.BATCH_BYTES:
                self._deliver(sock, lease, batches.pop(lease.worker_id)[1])
        for lease, dlv, _ in batches.values():
            self._deliver(sock, lease, dlv)
        led.gauges()

    def _deliver(self, sock: zmq.Socket, lease: Lease, items: list[Any]) -> None:
        """Send one DLV of (attempt, header, body) `items` to the worker holding `lease`, in the layout it reads."""
        if lease.packed:
            frames = [lease.route, p.DELIVER, p.pack(items)]
        else:
            frames = [lease.route, p.DELIVER, *(p.attempt_frame(i) if type(i) is int else i for i in items)]
        if self._send(sock, frames):
            self.ledger.stats.delivered += len(items) // 3
        else:
            lease.last_seen = -1e18  # the worker is gone: its lease expires next pass, its messages go to others

    def _send(self, sock: zmq.Socket, frames: list[Any]) -> bool:
        try:
            send_frames(sock, frames, _NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: peer gone; EAGAIN: peer not reading
            log.debug("sidecar: cannot send %s to %s: %s", frames[1], frames[0].hex(), exc.strerror)
            return False

    # -- one message ----------------------------------------------------------------------

    def _handle(self, store: Store, frames: list[bytes], now: float, mono: float, replies: list[list[Any]],
                confirms: dict[bytes, list[bytes]], rejects: dict[bytes, list[list[Any]]]) -> None:
        if len(frames) < 2:
            raise DecodeError("expected [routing id, command, ...]", frames)
        route, cmd = frames[0], frames[1]
        led = self.ledger
        if cmd == p.PUT:
            self._put(store, route, frames, now, confirms, rejects)
        elif cmd == p.ACK:
            m = p.unpack_map(frames[1:], "ACK", ("worker", "acks"))
            lease = led.leases.get(m["worker"])
            done = self._done
            for message_id, attempt in p.unpack_acks(m["acks"]):
                settled = led.settle(m["worker"], message_id, attempt)
                if settled is None:
                    continue
                entry = settled[1]
                done.append(entry)
                led.stats.acked += 1
                if entry.attempts > 1 or entry.budget_base:
                    store.add_history([(entry.id, entry.attempts, now, self._who(lease), "ack", None, None, None)])
            if lease is None:
                replies.append([route, p.WHO])
            else:
                lease.last_seen = mono
        elif cmd == p.NACK:
            self._nack(store, route, frames, now, mono, replies)
        elif cmd == p.HEARTBEAT:
            m = p.unpack_map(frames[1:], "HB", ("worker",))
            if not led.touch(m["worker"], mono):
                replies.append([route, p.WHO])
        elif cmd == p.READY:
            m = p.unpack_map(frames[1:], "RDY", ("worker", "queue", "window"))
            queue, window = m["queue"], m["window"]
            if type(window) is not int or window < 1 or type(m["worker"]) is not bytes:
                raise DecodeError("RDY: worker must be bytes and window a positive integer", frames)
            if queue not in led.books:
                replies.append([route, p.CONTROL_ERROR,
                                p.pack(f"sidecar {self.endpoint} does not serve queue {queue!r}; it serves: "
                                       f"{', '.join(led.books)}")])
                return
            if self.permissions is not None and not self.permissions.may_use_queue(self._who_sent, queue):
                replies.append([route, p.CONTROL_ERROR, p.pack(self._denied(self._who_sent, f"take from queue {queue!r}"))])
                return
            led.announce(m["worker"], route, str(m.get("name", "")), queue, window, mono,
                         packed=m.get("dlv") == p.DLV_PACKED)
        elif cmd == p.BYE:
            m = p.unpack_map(frames[1:], "BYE", ("worker",))
            lease = led.drop(m["worker"])
            if lease is not None:
                for entry in lease.inflight.values():
                    led.requeue(entry)
                lease.inflight.clear()
        elif cmd == p.CONTROL:
            m = p.unpack_map(frames[1:], "CTL", ("op",))
            if self.permissions is not None and not self.permissions.may_use_queue(self._who_sent, "*"):
                replies.append([route, p.CONTROL_ERROR,
                                p.pack(self._denied(self._who_sent, "control this sidecar (it needs queues: ['*'])"))])
                return
            try:
                replies.append([route, p.CONTROL_REPLY, p.pack(self._control(store, m, now))])
            except (ConfigError, KeyError, TypeError) as exc:
                replies.append([route, p.CONTROL_ERROR, p.pack(str(exc))])
        else:
            raise DecodeError(f"unknown command {bytes(cmd[:16])!r}", frames)

    def _put(self, store: Store, route: bytes, frames: list[bytes], now: float,
             confirms: dict[bytes, list[bytes]], rejects: dict[bytes, list[list[Any]]]) -> None:
        pairs = p.split_puts(frames[2:])
        led = self.ledger
        items: list[tuple[Envelope, bytes, bytes, float | None]] = []
        for i in range(0, len(pairs), 2):
            header, body = pairs[i], pairs[i + 1]
            try:
                env = codec.decode_header(header, frames)
            except DecodeError as exc:
                led.stats.decode_errors += 1
                _bad.warning(f"put:{route.hex()}", "sidecar %s: message from peer %s refused: %s", self.endpoint, route.hex(), exc)
                continue
            book = led.books.get(env.topic)
            if book is None:
                led.stats.rejected += 1
                rejects.setdefault(route, []).append(
                    [env.id, f"queue {env.topic!r} is not served by this sidecar (it serves: {', '.join(led.books)})"])
                continue
            if self.permissions is not None and not self.permissions.may_use_queue(self._who_sent, env.topic):
                rejects.setdefault(route, []).append([env.id, self._denied(self._who_sent, f"send to queue {env.topic!r}")])
                continue
            expires = env.deadline
            if book.policy.ttl is not None:
                expires = min(expires or float("inf"), now + book.policy.ttl)
            items.append((env, header, body, expires))
        if not items:
            return
        confirmed = confirms.setdefault(route, [])
        for (env, header, body, expires), seq in zip(items, store.reserve([item[0].id for item in items])):
            if seq is None:
                led.stats.duplicates += 1
            else:
                led.stats.received += 1
                entry = Entry(seq, env.id, env.topic, header, body, 0, 0, expires)
                self._fresh.append(entry)
                led.add(entry)
            confirmed.append(env.id)

    def _nack(self, store: Store, route: bytes, frames: list[bytes], now: float, mono: float, replies: list[list[Any]]) -> None:
        led = self.ledger
        m = p.unpack_map(frames[1:], "NAK", ("worker", "id", "attempt"))
        if type(m["id"]) is not bytes or type(m["attempt"]) is not int:
            raise DecodeError("NAK: id must be bytes and attempt an integer", frames)
        lease = led.leases.get(m["worker"])
        if lease is None:
            replies.append([route, p.WHO])
        else:
            lease.last_seen = mono
        settled = led.settle(m["worker"], m["id"], m["attempt"])
        if settled is None:
            return
        led.stats.nacked += 1
        entry = settled[1]
        retry_after = m.get("retry_after")
        if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or retry_after < 0):
            retry_after = None
        error_type = _text(m.get("error_type"), 200)
        store.add_history([(entry.id, entry.attempts, now, self._who(lease), "nack", error_type,
                            _text(m.get("error"), 2000), _text(m.get("traceback"), 8000))])
        self._after_failure(store, entry, now, error_type, retryable=m.get("retryable", True) is not False,
                            retry_after=retry_after)

    def _after_failure(self, store: Store, entry: Entry, now: float, error_type: str | None, *,
                       retryable: bool = True, retry_after: float | None = None) -> None:
        outcome = self.ledger.failure(entry, now, retryable=retryable, retry_after=retry_after)
        if outcome.dead:
            self._dead(store, entry, outcome.reason, error_type, now)
        else:
            store.mark_delayed(entry, outcome.due)
            self.ledger.delay(entry, outcome.due)

    def _lease_lost(self, store: Store, lease: Lease, now: float) -> None:
        if lease.inflight:
            log.warning("sidecar: worker %s on queue %s lost its lease; %d message(s) go to other workers",
                        self._who(lease), lease.queue, len(lease.inflight))
        store.add_history((e.id, e.attempts, now, self._who(lease), "lease-expired", "LeaseExpired",
                           f"no heartbeat from the worker for {self.config.lease_timeout:g} s", None)
                          for e in lease.inflight.values())
        for entry in list(lease.inflight.values()):
            if self.ledger.books[entry.queue].policy.exhausted(entry.budget_used):
                self._dead(store, entry, "max-attempts", "LeaseExpired", now)
            else:
                self.ledger.requeue(entry)
        lease.inflight.clear()

    def _dead(self, store: Store, entry: Entry, reason: str, error_type: str | None, now: float) -> None:
        store.mark_dead(entry, reason, error_type, now)
        self.ledger.stats.dead_lettered += 1
        if reason == "expired":
            self.ledger.stats.expired += 1
        _bad.warning(f"dead:{entry.queue}:{reason}", "sidecar: message %s on queue %s dead-lettered (%s) after %d attempt(s)",
                     entry.id.hex(), entry.queue, reason, entry.attempts)

    @staticmethod
    def _who(lease: Lease | None) -> str | None:
        return None if lease is None else lease.label

    # -- control --------------------------------------------------------------------------

    def _control(self, store: Store, m: dict[str, Any], now: float) -> Any:
        op = m["op"]
        if op == "stats":
            if time.monotonic() - self._counted_at > COUNTS_MAX_AGE:
                self._store_counts, self._counted_at = store.counts(), time.monotonic()
            return self.snapshot()
        flt = DeadLetterFilter.from_wire(m.get("filter") or {})
        if op == "dlq.list":
            return [r.to_wire() for r in store.dead_letters(flt, history=bool(m.get("history")))]
        if op == "dlq.count":
            return store.count_dead(flt)
        if op == "dlq.show":
            record = store.record(m["id"])
            return None if record is None else record.to_wire()
        if op == "dlq.replay":
            entries = store.replay(flt, now)
            for entry in entries:
                if entry.queue in self.ledger.books:
                    self.ledger.mark_spilled(entry.queue, entry.seq)
            self.ledger.stats.replayed += len(entries)
            return {"replayed": len(entries), "ids": [e.id for e in entries],
                    "not_served": sorted({e.queue for e in entries} - set(self.ledger.books))}
        if op == "dlq.purge":
            return {"purged": store.purge(flt)}
        raise ConfigError(f"unknown control operation {op!r}")

    def snapshot(self) -> dict[str, Any]:
        """Counters, gauges, store totals, queues and workers, as plain values."""
        led = self.ledger
        led.gauges()
        return {
            "endpoint": self.endpoint,
            "store": str(self.config.store),
            "counters": led.stats.snapshot(),
            "stored": dict(self._store_counts),
            "queues": {name: {"policy": b.policy.to_dict(), "ready_in_memory": len(b.ready), "delayed": len(b.delayed),
                              "backlog_in_store": b.spilled, "workers": len(b.workers)}
                       for name, b in led.books.items()},
            "workers": [{"worker": self._who(lease), "queue": lease.queue, "window": lease.window,
                         "in_flight": len(lease.inflight)} for lease in led.leases.values()],
        }


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


class SidecarProcess(ChildProcess):
    """Launcher: runs `zfabric sidecar` as a child process and learns its bound endpoint from its ready line.

    `extra_args` take any `zfabric sidecar` option (`--max-attempts 3`, `--synchronous normal`, ...).
    """

    READY = re.compile(r"^zfabric sidecar ready endpoint=(\S+)")
    what = "sidecar process"

    def __init__(self, store: str, queues: Sequence[str], *, endpoint: str = "tcp://127.0.0.1:0",
                 extra_args: Sequence[str] = (), ready_timeout: float = 15.0) -> None:
        args = ["sidecar", "--store", str(store), "--endpoint", endpoint, "--no-live"]
        for name in queues:
            args += ["--queue", name]
        super().__init__([*args, *extra_args], ready_timeout=ready_timeout)
        self.endpoint = endpoint

    def _on_ready(self, match: re.Match[str]) -> None:
        self.endpoint = match.group(1)
