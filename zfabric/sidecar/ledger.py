"""The sidecar's in-memory bookkeeping, without I/O: ready and delayed messages, worker leases, credit.

The service asks the ledger what to do (who gets which message, which leases ran out,
what becomes of a failure) and makes it durable and sends it; the ledger never touches a
socket or the store, and every time it uses comes from its caller.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .._counters import CounterSet
from .policy import RetryPolicy
from .store import Entry


@dataclass
class SidecarCounters(CounterSet):
    """What an operator watches on a sidecar; `in_flight`, `ready`, `delayed` and `workers` are gauges."""

    received: int = 0
    confirmed: int = 0
    duplicates: int = 0
    rejected: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    expired: int = 0
    late_acks: int = 0
    leases_expired: int = 0
    replayed: int = 0
    decode_errors: int = 0
    denied: int = 0
    in_flight: int = 0
    ready: int = 0
    delayed: int = 0
    workers: int = 0


GAUGES = frozenset({"in_flight", "ready", "delayed", "workers"})


@dataclass(slots=True, eq=False)
class Lease:
    """One worker's claim: where to send, how many it may hold, what it holds, when it was last heard."""

    worker_id: bytes
    route: bytes
    name: str
    queue: str
    window: int
    last_seen: float
    inflight: dict[bytes, Entry] = field(default_factory=dict)
    label: str = ""
    """How history and logs name this worker: its name and the start of its id."""
    packed: bool = True
    """The worker reads DLV packed in one frame (it said so in RDY); False: a frame per attempt, header, body."""

    def __post_init__(self) -> None:
        self.label = f"{self.name or 'worker'}/{self.worker_id.hex()[:8]}"

    @property
    def free(self) -> int:
        return self.window - len(self.inflight)


@dataclass(slots=True, eq=False)
class QueueBook:
    """One queue: its policy, the ready messages held in memory, the delayed ones, its workers."""

    name: str
    policy: RetryPolicy
    ready: deque[Entry] = field(default_factory=deque)
    resident: set[int] = field(default_factory=set)
    """Sequence numbers in `ready`, so paging the backlog in never loads one twice."""
    delayed: list[tuple[float, int, Entry]] = field(default_factory=list)
    spilled: bool = False
    """True while ready messages exist in the store that are not in memory."""
    spill_from: int = 0
    workers: list[bytes] = field(default_factory=list)
    turn: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """What becomes of a message whose delivery failed: dead (with a reason) or retried at `due`."""

    dead: bool
    reason: str = ""
    due: float = 0.0


class Ledger:
    """Everything the sidecar knows in memory; the store holds the durable truth it is rebuilt from."""

    def __init__(self, policies: Mapping[str, RetryPolicy], *, lease_timeout: float = 3.0, cache_limit: int = 10_000) -> None:
        self.books = {name: QueueBook(name, policy) for name, policy in policies.items()}
        self.leases: dict[bytes, Lease] = {}
        self.lease_timeout = lease_timeout
        self.cache_limit = cache_limit
        self.stats = SidecarCounters()

    # -- messages in ----------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """A newly stored message joins the back of its queue (or stays in the store while the backlog is paged)."""
        book = self.books[entry.queue]
        if book.spilled or len(book.ready) >= self.cache_limit:
            if not book.spilled:
                book.spilled, book.spill_from = True, entry.seq
            return
        book.ready.append(entry)
        book.resident.add(entry.seq)

    def requeue(self, entry: Entry) -> None:
        """A message taken back from a worker goes to the front: it has waited longest."""
        book = self.books[entry.queue]
        book.ready.appendleft(entry)
        book.resident.add(entry.seq)

    def delay(self, entry: Entry, due: float) -> None:
        heapq.heappush(self.books[entry.queue].delayed, (due, entry.seq, entry))

    def mark_spilled(self, queue: str, from_seq: int = 0) -> None:
        """Ready messages from `from_seq` on may be in the store and not in memory (start-up, replay)."""
        book = self.books[queue]
        book.spill_from = min(book.spill_from, from_seq) if book.spilled else from_seq
        book.spilled = True

    def wants_page(self) -> Iterator[tuple[str, int, int]]:
        """(queue, from_seq, how many) for each queue whose in-memory part runs low while the store holds more."""
        for book in self.books.values():
            if book.spilled and len(book.ready) < self.cache_limit // 2:
                yield book.name, book.spill_from, self.cache_limit - len(book.ready)

    def paged_in(self, queue: str, entries: list[Entry], asked: int) -> None:
        """Entries loaded from the store for `queue`; fewer than `asked` means the backlog is all in memory."""
        book = self.books[queue]
        for e in entries:
            if e.seq not in book.resident:
                book.ready.append(e)
                book.resident.add(e.seq)
        if entries:
            book.spill_from = entries[-1].seq + 1
        if len(entries) < asked:
            book.spilled = False

    def release_due(self, now: float) -> int:
        """Move delayed messages whose time has come to the ready queue; returns how many."""
        moved = 0
        for book in self.books.values():
            while book.delayed and book.delayed[0][0] <= now:
                _, _, entry = heapq.heappop(book.delayed)
                book.ready.append(entry)
                book.resident.add(entry.seq)
                moved += 1
        return moved

    def next_due(self) -> float | None:
        """When the earliest delayed message becomes ready (wall clock), if any."""
        dues = [b.delayed[0][0] for b in self.books.values() if b.delayed]
        return min(dues) if dues else None

    # -- workers ----------------------------------------------------------------------------

    def announce(self, worker_id: bytes, route: bytes, name: str, queue: str, window: int, now: float,
                 packed: bool = True) -> Lease:
        """A worker (re)announces itself; an existing lease keeps what it holds."""
        lease = self.leases.get(worker_id)
        if lease is None:
            lease = self.leases[worker_id] = Lease(worker_id, route, name, queue, window, now)
            self.books[queue].workers.append(worker_id)
        else:
            lease.route, lease.window, lease.last_seen = route, window, now
        lease.packed = packed
        return lease

    def touch(self, worker_id: bytes, now: float) -> bool:
        """A heartbeat; False when the worker has no lease (it must announce itself again)."""
        lease = self.leases.get(worker_id)
        if lease is None:
            return False
        lease.last_seen = now
        return True

    def settle(self, worker_id: bytes, message_id: bytes, attempt: int) -> tuple[Lease, Entry] | None:
        """The lease and entry an ack or nack refers to; None (counted as late) if that delivery is no longer current."""
        lease = self.leases.get(worker_id)
        entry = lease.inflight.get(message_id) if lease is not None else None
        if lease is None or entry is None or entry.attempts != attempt:
            self.stats.late_acks += 1
            return None
        del lease.inflight[message_id]
        return lease, entry

    def expired_leases(self, now: float) -> list[Lease]:
        """Leases not heard from within the lease timeout; removed, their messages still in `inflight`."""
        dead = [lease for lease in self.leases.values() if now - lease.last_seen > self.lease_timeout]
        for lease in dead:
            self.drop(lease.worker_id)
        self.stats.leases_expired += len(dead)
        return dead

    def drop(self, worker_id: bytes) -> Lease | None:
        lease = self.leases.pop(worker_id, None)
        if lease is not None:
            self.books[lease.queue].workers.remove(worker_id)
        return lease

    def failure(self, entry: Entry, now: float, *, retryable: bool = True, retry_after: float | None = None) -> Failure:
        """What becomes of a failed delivery, by the queue's policy and the message's deadline."""
        policy = self.books[entry.queue].policy
        if not retryable:
            return Failure(True, "not-retryable")
        if policy.exhausted(entry.budget_used):
            return Failure(True, "max-attempts")
        due = now + (retry_after if retry_after is not None else policy.delay(entry.budget_used))
        if entry.expires_at is not None and due >= entry.expires_at:
            return Failure(True, "expired")
        return Failure(False, due=due)

    # -- deliveries -------------------------------------------------------------------------

    def deliveries(self, now: float) -> tuple[list[tuple[Lease, Entry]], list[Entry]]:
        """Hand ready messages to workers with free credit, round-robin, counting each attempt.

        Returns (lease, entry) pairs to send and the entries found expired on the way (to be
        dead-lettered, never handed to a handler).
        """
        out: list[tuple[Lease, Entry]] = []
        expired: list[Entry] = []
        for book in self.books.values():
            if not book.ready or not book.workers:
                continue
            open_leases = [self.leases[w] for w in book.workers if self.leases[w].free > 0]
            if not open_leases:
                continue
            book.turn = (book.turn + 1) % len(open_leases)
            open_leases = open_leases[book.turn:] + open_leases[:book.turn]
            while book.ready and open_leases:
                for lease in list(open_leases):
                    if not book.ready:
                        break
                    entry = book.ready.popleft()
                    book.resident.discard(entry.seq)
                    if entry.expires_at is not None and now >= entry.expires_at:
                        expired.append(entry)
                        continue
                    entry.attempts += 1
                    entry.worker = lease.label
                    lease.inflight[entry.id] = entry
                    out.append((lease, entry))
                    if lease.free <= 0:
                        open_leases.remove(lease)
        return out, expired

    def gauges(self) -> None:
        """Refresh the gauge counters from the current state."""
        s = self.stats
        s.in_flight = sum(len(lease.inflight) for lease in self.leases.values())
        s.ready = sum(len(b.ready) for b in self.books.values())
        s.delayed = sum(len(b.delayed) for b in self.books.values())
        s.workers = len(self.leases)
