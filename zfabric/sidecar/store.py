"""The sidecar's durable state in SQLite (WAL): messages, their attempt history, the dead-letter queue.

One writer: the sidecar thread that owns the connection (a lock file keeps a second
sidecar, or an offline `zfabric dlq replay`, from writing at the same time). Callers group
many changes into one transaction (`begin`/`commit`), which is what makes durable
confirms cheap: one fsync covers every message of a pass. docs/reliability.md says what
each `synchronous` setting survives.

A run of messages that arrive together from one producer (consecutive ids, one queue) is
stored as one row of `batches`, not a row per message: the row holds the messages and one
state byte for each (ready, out with worker k on its first attempt, done, moved). A message
leaves its batch for a row of `messages` of its own as soon as it needs more than that: a
second attempt, a delay, the dead-letter queue. A batch row costs about what one message
row does, so a busy sidecar writes a fraction of the rows it would.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .. import codec
from ..envelope import Envelope
from ..errors import ConfigError, DecodeError, StoreError

READY, DELAYED, INFLIGHT, DONE, DEAD = 0, 1, 2, 3, 4
STATE_NAMES = {READY: "ready", DELAYED: "delayed", INFLIGHT: "in-flight", DONE: "done", DEAD: "dead"}
SCHEMA_VERSION = 2
"""1: messages and history only; 2 adds batches (a version-1 file is upgraded in place when opened)."""
SYNCHRONOUS = ("full", "normal")
UPDATE_CHUNK = 500
"""Rows per `WHERE seq IN (...)` statement at most (SQLite before 3.32 allows 999 parameters)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    budget_base INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL,
    finished_at REAL,
    reason TEXT,
    error_type TEXT,
    worker TEXT,
    header BLOB,
    body BLOB
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS messages_dead ON messages (seq) WHERE state = 4;
CREATE TABLE IF NOT EXISTS history (
    message_id BLOB NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    worker TEXT,
    outcome TEXT NOT NULL,
    error_type TEXT,
    error_message TEXT,
    traceback TEXT
);
CREATE INDEX IF NOT EXISTS history_by_message ON history (message_id);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    origin BLOB NOT NULL,
    first INTEGER NOT NULL,
    count INTEGER NOT NULL,
    received_at REAL NOT NULL,
    finished_at REAL,
    done INTEGER NOT NULL DEFAULT 0,
    state BLOB NOT NULL,
    workers BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (seq INTEGER PRIMARY KEY, items BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_id ON batches (origin, first);
CREATE INDEX IF NOT EXISTS batches_open ON batches (seq) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS batches_finished ON batches (finished_at) WHERE finished_at IS NOT NULL;
"""
# batches: message i of a row has sequence number seq + i and id origin + (first + i) as 8 big-endian
# bytes; `state` is a byte per message (below), `workers` msgpack [label, ...] for the in-flight bytes.
# batch_items: the messages, msgpack [header, body, expires_at] * count, deleted once every message is
# done or moved. A table apart, so that the state changes of a pass rewrite small rows, not the messages.

B_READY, B_DONE, B_MOVED, B_WORKER = 0, 1, 2, 3
"""A batch's state bytes: ready, acknowledged, moved to a row of its own; B_WORKER + k: out with
workers[k] on the first attempt."""
MIN_RUN = 2
"""Fewer consecutive messages than this are stored a row each."""
MAX_RUN = 1000
"""Messages per batch row at most; a longer run takes several rows."""
_MAX_WORKERS = 256 - B_WORKER
_MAX_COUNTER = 1 << 62
"""Id counters a batch row holds (SQLite's INTEGER is signed 64-bit)."""


@dataclass(slots=True, eq=False)
class Entry:
    """A live message as the sidecar holds it in memory (mutable bookkeeping, not the envelope)."""

    seq: int
    id: bytes
    queue: str
    header: bytes
    body: bytes
    attempts: int = 0
    budget_base: int = 0
    expires_at: float | None = None
    worker: str | None = None
    """Who holds the current delivery (written with it, so a crash report can name the worker)."""
    batch: Batch | None = None
    """The batch row that holds this message, or None when it has a row of its own."""

    @property
    def budget_used(self) -> int:
        """Deliveries since the message last got a fresh budget (arrival or replay)."""
        return self.attempts - self.budget_base


@dataclass(slots=True, eq=False)
class Batch:
    """A batch row the sidecar still has messages of (ready or in flight), with its state bytes in memory."""

    seq: int
    queue: str
    origin: bytes
    first: int
    count: int
    received_at: float
    state: bytearray
    workers: list[str | None]
    open: int = 0
    """Messages still ready or in flight; the batch is finished at 0."""
    finished_at: float | None = None

    def mark(self, entry: Entry, value: int) -> None:
        i = entry.seq - self.seq
        if self.state[i] in (B_DONE, B_MOVED):
            return  # settled through another entry of the same message: it stays settled
        self.state[i] = value
        if value in (B_DONE, B_MOVED):
            self.open -= 1

    def is_done(self, entry: Entry) -> bool:
        return self.state[entry.seq - self.seq] == B_DONE

    def worker_code(self, label: str | None) -> int | None:
        """The state byte for "out with `label`", or None when the row has no room for another worker."""
        try:
            return B_WORKER + self.workers.index(label)
        except ValueError:
            if len(self.workers) >= _MAX_WORKERS:
                return None
            self.workers.append(label)
            return B_WORKER + len(self.workers) - 1

    def ident(self, i: int) -> bytes:
        return self.origin + (self.first + i).to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One line of a message's history: a failed delivery, a lease lost, a replay, or the final ack."""

    attempt: int
    at: float
    worker: str | None
    outcome: str
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """What the store knows about one message: the original envelope frames, its state and history."""

    seq: int
    id: bytes
    queue: str
    state: str
    attempts: int
    received_at: float
    finished_at: float | None
    reason: str | None
    error_type: str | None
    header: bytes | None
    body: bytes | None
    history: tuple[Attempt, ...] = field(default=())

    @property
    def envelope(self) -> Envelope | None:
        """The original envelope as the producer sent it (None once an acked message's body is dropped)."""
        if self.header is None or self.body is None:
            return None
        try:
            return codec.decode([self.header, self.body])
        except DecodeError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (ids in hex) for the CLI and exports."""
        env = self.envelope
        return {
            "id": self.id.hex(),
            "queue": self.queue,
            "state": self.state,
            "attempts": self.attempts,
            "received_at": self.received_at,
            "dead_at" if self.state == "dead" else "finished_at": self.finished_at,
            "reason": self.reason,
            "error_type": self.error_type,
            "envelope": env.to_dict() if env is not None else None,
            "history": [a.to_dict() for a in self.history],
        }

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict (raw frames kept as bytes) for the control protocol."""
        d = {k: getattr(self, k) for k in self.__slots__ if k != "history"}
        d["history"] = [a.to_dict() for a in self.history]
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> MessageRecord:
        fields: dict[str, Any] = {k: d.get(k) for k in cls.__slots__ if k != "history"}
        fields["history"] = tuple(Attempt(**a) for a in d.get("history", ()))
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operation applies to; every field narrows the set (None: no limit)."""

    queue: str | None = None
    error_type: str | None = None
    since: float | None = None
    """Dead-lettered at or after this time (epoch seconds)."""
    until: float | None = None
    """Dead-lettered before this time (epoch seconds)."""
    ids: tuple[bytes, ...] | None = None
    after_seq: int = 0
    """For paging: only entries stored after this sequence number."""
    limit: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {k: (list(v) if k == "ids" and v is not None else v) for k in self.__slots__ for v in [getattr(self, k)]}

    @classmethod
    def from_wire(cls, d: Any) -> DeadLetterFilter:
        if type(d) is not dict:
            raise ConfigError("filter must be a map")
        unknown = set(d) - set(cls.__slots__)
        if unknown:
            raise ConfigError(f"filter: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        ids = d.get("ids")
        if ids is not None and (type(ids) is not list or any(type(i) is not bytes for i in ids)):
            raise ConfigError("filter.ids must be a list of byte strings")
        return cls(**{**d, "ids": tuple(ids) if ids is not None else None})

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = [f"state = {DEAD}", "seq > ?"]  # a literal, so the partial index applies
        params: list[Any] = [self.after_seq]
        if self.queue is not None:
            clauses.append("queue = ?")
            params.append(self.queue)
        if self.error_type is not None:
            clauses.append("error_type = ?")
            params.append(self.error_type)
        if self.since is not None:
            clauses.append("finished_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("finished_at < ?")
            params.append(self.until)
        if self.ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(self.ids))})" if self.ids else "0")
            params.extend(self.ids)
        return " AND ".join(clauses), params


def _packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _by_seq(e: Entry) -> int:
    return e.seq


_RECORD_COLUMNS = "seq, id, queue, state, attempts, received_at, finished_at, reason, error_type, header, body"


class Store:
    """The SQLite file behind one sidecar. Not thread-safe: use it from the thread that opened it."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ConfigError(f"synchronous: expected one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        if self.path.parent and not self.path.parent.exists():
            raise ConfigError(f"store {self.path}: directory {self.path.parent} does not exist")
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"store {self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                                 "use a local filesystem")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._conn.execute("PRAGMA cache_size=-65536")  # 64 MiB of page cache: the hot rows stay in memory
            self._conn.execute("PRAGMA wal_autocheckpoint=8192")  # checkpoint every ~32 MiB, not every 4 MiB
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if self._has_meta() else None
            if row is not None and row[0] not in (1, SCHEMA_VERSION):
                raise StoreError(f"store {self.path}: schema version {row[0]}, this zfabric reads {SCHEMA_VERSION}")
            self._conn.executescript(_SCHEMA)
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:  # version 1: the batches table was just added
                self._conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc
        self._in_tx = False
        self._reserved: set[bytes] = set()
        """Ids given a sequence number in this transaction (their rows are written at its end)."""
        self._live: dict[int, Batch] = {}
        """Batches with messages ready or in flight, by first sequence number (in that order)."""
        self._dirty: dict[int, Batch] = {}
        """Batches whose state changed in this transaction, written at commit."""
        self._load_live()
        self._next_seq = self._seq_after()

    def _has_meta(self) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is not None

    def _seq_after(self) -> int:
        last = self._conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()[0]
        row = self._conn.execute("SELECT seq + count - 1 FROM batches ORDER BY seq DESC LIMIT 1").fetchone()
        return max(last, row[0] if row else 0) + 1

    def _load_live(self) -> None:
        self._live.clear()
        for seq, queue, origin, first, count, received, state, workers in self._conn.execute(
                "SELECT seq, queue, origin, first, count, received_at, state, workers FROM batches "
                "WHERE finished_at IS NULL ORDER BY seq"):
            marks = bytearray(state)
            self._live[seq] = Batch(seq, queue, origin, first, count, received, marks, msgpack.unpackb(workers),
                                    count - marks.count(B_DONE) - marks.count(B_MOVED))

    # -- transactions ------------------------------------------------------------------

    def begin(self) -> None:
        """Start a write transaction; every change until commit() becomes durable together."""
        self._conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True

    def commit(self) -> None:
        """Make the transaction durable (per the synchronous setting); only then may anything be confirmed."""
        if self._dirty:
            self._flush()
        self._conn.execute("COMMIT")
        self._in_tx = False
        self._reserved.clear()

    def rollback(self) -> None:
        if self._in_tx:
            try:
                self._conn.execute("ROLLBACK")
            finally:
                self._in_tx = False
                self._reserved.clear()
                self._dirty.clear()
                self._load_live()  # memory back to what the file says
                self._next_seq = self._seq_after()

    def close(self) -> None:
        self.rollback()
        self._conn.close()

    def _flush(self) -> None:
        """Write the state bytes of every batch changed in this transaction; a finished one drops its messages."""
        open_rows, finished_rows = [], []
        for b in self._dirty.values():
            if b.open:
                open_rows.append((bytes(b.state), _packb(b.workers), b.seq))
            else:
                finished_rows.append((bytes(b.state), _packb(b.workers), b.finished_at, b.state.count(B_DONE), b.seq))
        if open_rows:
            self._conn.executemany("UPDATE batches SET state = ?, workers = ? WHERE seq = ?", open_rows)
        if finished_rows:
            self._conn.executemany("UPDATE batches SET state = ?, workers = ?, finished_at = ?, done = ? WHERE seq = ?",
                                   finished_rows)
            self._conn.executemany("DELETE FROM batch_items WHERE seq = ?", ((r[-1],) for r in finished_rows))
        self._dirty.clear()

    # -- the sidecar's hot path --------------------------------------------------------

    def reserve(self, ids: Sequence[bytes]) -> list[int | None]:
        """A sequence number for each id not stored yet, None for a known one (a resend) or a repeat in `ids`.

        The rows themselves are written by insert(), later in the same transaction, once the
        caller knows whether each message went straight out to a worker.
        """
        known = self._stored(ids)
        reserved = self._reserved
        seqs: list[int | None] = []
        for ident in ids:
            if ident in known or ident in reserved:
                seqs.append(None)
                continue
            reserved.add(ident)
            seqs.append(self._next_seq)
            self._next_seq += 1
        return seqs

    def _stored(self, ids: Sequence[bytes]) -> set[bytes]:
        """The ids among `ids` that the store holds, in a batch or a row of their own.

        Ids a zfabric producer made (an 8-byte origin and a counter) are looked up by range, one
        query per producer and table; others one by one.
        """
        by_origin: dict[bytes, list[bytes]] = {}
        others: list[bytes] = []
        for ident in ids:
            if len(ident) == 16:
                by_origin.setdefault(ident[:8], []).append(ident)
            else:
                others.append(ident)
        found: set[bytes] = set()
        execute = self._conn.execute
        for origin, idents in by_origin.items():
            asked = set(idents)
            found.update(r[0] for r in execute("SELECT id FROM messages WHERE id BETWEEN ? AND ?", (min(idents), max(idents)))
                         if r[0] in asked)
            cs = [int.from_bytes(i[8:], "big") for i in idents]
            lo, hi = min(cs), max(cs)
            if lo >= _MAX_COUNTER:
                continue
            for first, count in execute("SELECT first, count FROM batches WHERE origin = ? AND first BETWEEN ? AND ?",
                                        (origin, lo - MAX_RUN + 1, min(hi, _MAX_COUNTER))):
                found.update(origin + c.to_bytes(8, "big") for c in cs if first <= c < first + count)
        for i in range(0, len(others), 500):
            chunk = others[i:i + 500]
            found.update(r[0] for r in execute(f"SELECT id FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def insert(self, entries: Sequence[Entry], received_at: float) -> None:
        """Write reserved messages: ready, or already out with a worker (attempt counted) if delivered in this pass.

        Runs of consecutive ids from one producer to one queue go into batch rows.
        """
        rows: list[Entry] = []
        batches: list[tuple[Any, ...]] = []
        items: list[tuple[int, bytes]] = []
        i, n = 0, len(entries)
        while i < n:
            run = self._run_length(entries, i)
            if run < MIN_RUN:
                rows.append(entries[i])
                i += 1
                continue
            row = self._new_batch(entries[i:i + run], received_at)
            batches.append(row[:-1])
            items.append((row[0], row[-1]))
            i += run
        if batches:
            self._conn.executemany(
                "INSERT INTO batches (seq, queue, origin, first, count, received_at, state, workers) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", batches)
            self._conn.executemany("INSERT INTO batch_items (seq, items) VALUES (?, ?)", items)
        if rows:
            self._conn.executemany(
                "INSERT INTO messages (seq, id, queue, state, attempts, available_at, received_at, expires_at, worker, header, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.seq, e.id, e.queue, INFLIGHT if e.attempts else READY, e.attempts, received_at, received_at,
                  e.expires_at, e.worker, e.header, e.body) for e in rows])

    @staticmethod
    def _run_length(entries: Sequence[Entry], i: int) -> int:
        """How many entries from `i` on can share a batch row: consecutive sequence numbers and id counters of one
        producer, one queue, at most the first attempt, and no more workers than the state bytes can name."""
        e0 = entries[i]
        ident = e0.id
        if len(ident) != 16 or e0.attempts > 1 or e0.budget_base:
            return 1
        origin, counter = ident[:8], int.from_bytes(ident[8:], "big")
        if counter + MAX_RUN >= _MAX_COUNTER:
            return 1
        seq, queue = e0.seq, e0.queue
        workers = {e0.worker} if e0.attempts else set()
        k, limit = 1, min(len(entries) - i, MAX_RUN)
        while k < limit:
            e = entries[i + k]
            if (e.seq != seq + k or e.queue != queue or e.attempts > 1 or e.budget_base
                    or e.id != origin + (counter + k).to_bytes(8, "big")):
                break
            if e.attempts:
                workers.add(e.worker)
                if len(workers) > _MAX_WORKERS:
                    break
            k += 1
        return k

    def _new_batch(self, run: Sequence[Entry], received_at: float) -> tuple[Any, ...]:
        e0 = run[0]
        b = Batch(e0.seq, e0.queue, e0.id[:8], int.from_bytes(e0.id[8:], "big"), len(run), received_at,
                  bytearray(len(run)), [], len(run))
        items: list[Any] = []
        for j, e in enumerate(run):
            items += (e.header, e.body, e.expires_at)
            e.batch = b
            if e.attempts:
                b.state[j] = b.worker_code(e.worker)  # type: ignore[assignment]  # _run_length left room
        self._live[b.seq] = b
        return (b.seq, b.queue, b.origin, b.first, b.count, received_at, bytes(b.state), _packb(b.workers), _packb(items))

    def mark_delivered(self, entries: Iterable[Entry]) -> None:
        """These messages are now out with a worker (entry.worker), their attempt counted."""
        rows: list[tuple[tuple[Any, ...], int]] = []
        for e in entries:
            b = self._batch(e)
            if b is None:
                rows.append(((e.attempts, e.worker), e.seq))
                continue
            if b.is_done(e):
                continue
            code = b.worker_code(e.worker) if e.attempts == 1 else None
            if code is None:
                self._move(e, INFLIGHT, time.time())
            else:
                b.mark(e, code)
                self._dirty[b.seq] = b
        if rows:
            self._update_grouped("state = 2, attempts = ?, worker = ?", rows)

    def mark_done(self, entries: Iterable[Entry], finished_at: float) -> None:
        """Acknowledged. The body is dropped; the id stays for deduplication."""
        rows: list[tuple[tuple[Any, ...], int]] = []
        for e in entries:
            b = self._batch(e)
            if b is None:
                rows.append(((finished_at,), e.seq))
            else:
                b.mark(e, B_DONE)
                self._changed(b, finished_at)
        if rows:
            self._update_grouped("state = 3, finished_at = ?, body = NULL", rows)

    def _update_grouped(self, assignments: str, rows: Iterable[tuple[tuple[Any, ...], int]]) -> None:
        """UPDATE the rows of each (values, seq) pair, one statement per distinct values and UPDATE_CHUNK rows:
        a pass's rows mostly share them, and `seq IN (...)` costs about a third of one statement per row."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for values, seq in rows:
            groups.setdefault(values, []).append(seq)
        for values, seqs in groups.items():
            for i in range(0, len(seqs), UPDATE_CHUNK):
                chunk = seqs[i:i + UPDATE_CHUNK]
                self._conn.execute(f"UPDATE messages SET {assignments} WHERE seq IN ({','.join('?' * len(chunk))})",
                                   (*values, *chunk))

    def mark_delayed(self, entry: Entry, available_at: float) -> None:
        b = self._batch(entry)
        if b is not None:
            if not b.is_done(entry):
                self._move(entry, DELAYED, time.time(), available_at=available_at)
        else:
            self._conn.execute("UPDATE messages SET state = 1, available_at = ? WHERE seq = ?", (available_at, entry.seq))

    def mark_dead(self, entry: Entry, reason: str, error_type: str | None, at: float) -> None:
        b = self._batch(entry)
        if b is not None:
            if not b.is_done(entry):
                self._move(entry, DEAD, at, reason=reason, error_type=error_type, finished_at=at)
        else:
            self._conn.execute("UPDATE messages SET state = 4, reason = ?, error_type = ?, finished_at = ? WHERE seq = ?",
                               (reason, error_type, at, entry.seq))

    @staticmethod
    def _batch(e: Entry) -> Batch | None:
        """The batch that still holds `e`'s message, or None when the message has a row of its own; also when
        another entry of the same message moved it there (the sidecar can hold two for a moment: see
        Sidecar._pass). A message already acknowledged stays so whatever its other entries report."""
        b = e.batch
        if b is not None and b.state[e.seq - b.seq] == B_MOVED:
            e.batch = b = None
        return b

    def _move(self, e: Entry, state: int, now: float, *, available_at: float | None = None, reason: str | None = None,
              error_type: str | None = None, finished_at: float | None = None) -> None:
        """Give a batch message a row of its own (it needs more than its batch's state byte can say)."""
        b = e.batch
        assert b is not None
        self._conn.execute(
            "INSERT INTO messages (seq, id, queue, state, attempts, budget_base, available_at, received_at, expires_at, "
            "finished_at, reason, error_type, worker, header, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.seq, e.id, e.queue, state, e.attempts, e.budget_base, now if available_at is None else available_at,
             b.received_at, e.expires_at, finished_at, reason, error_type, e.worker, e.header, e.body))
        b.mark(e, B_MOVED)
        e.batch = None
        self._changed(b, now)

    def _changed(self, b: Batch, now: float) -> None:
        self._dirty[b.seq] = b
        if not b.open and self._live.pop(b.seq, None) is not None:
            b.finished_at = now

    def add_history(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """(message_id, attempt, at, worker, outcome, error_type, error_message, traceback) rows."""
        self._conn.executemany("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def recover(self) -> list[tuple[float, Entry]]:
        """At start: messages that were out with workers are ready again; returns the delayed ones with their due time.

        Each of those deliveries gets a history line: its outcome never reached the store.
        """
        now = time.time()
        why = "the sidecar stopped while this delivery was out; its outcome is unknown"
        self.add_history(self._conn.execute(
            "SELECT id, attempts, ?, worker, 'interrupted', 'SidecarRestart', ?, NULL "
            "FROM messages WHERE state = 2", (now, why)).fetchall())
        self._conn.execute("UPDATE messages SET state = 0 WHERE state = 2")
        for b in list(self._live.values()):
            out = [i for i, v in enumerate(b.state) if v >= B_WORKER]
            if not out:
                continue
            items = self._items(b)
            for i in out:
                e = self._entry(b, i, items)
                e.attempts, e.worker = 1, b.workers[b.state[i] - B_WORKER]
                self.add_history([(e.id, 1, now, e.worker, "interrupted", "SidecarRestart", why, None)])
                self._move(e, READY, now)  # the attempt stays counted
        rows = self._conn.execute(
            "SELECT available_at, seq, id, queue, header, body, attempts, budget_base, expires_at "
            "FROM messages WHERE state = 1 ORDER BY available_at").fetchall()
        return [(r[0], Entry(*r[1:])) for r in rows]

    def _items(self, b: Batch) -> list[Any]:
        row = self._conn.execute("SELECT items FROM batch_items WHERE seq = ?", (b.seq,)).fetchone()
        if row is None:
            raise StoreError(f"store {self.path}: batch {b.seq} has lost its messages")
        return msgpack.unpackb(row[0])  # type: ignore[no-any-return]

    @staticmethod
    def _entry(b: Batch, i: int, items: Sequence[Any]) -> Entry:
        return Entry(b.seq + i, b.ident(i), b.queue, items[3 * i], items[3 * i + 1], 0, 0, items[3 * i + 2], None, b)

    def load_ready(self, queue: str, from_seq: int, limit: int) -> list[Entry]:
        """Ready messages of `queue` from `from_seq` on, oldest first (paging the backlog into memory)."""
        found = [Entry(*r) for r in self._conn.execute(
            "SELECT seq, id, queue, header, body, attempts, budget_base, expires_at FROM messages "
            "WHERE state = 0 AND queue = ? AND seq >= ? ORDER BY seq LIMIT ?", (queue, from_seq, limit)).fetchall()]
        taken, make = 0, Entry
        for b in self._live.values():
            if taken >= limit:
                break
            if b.queue != queue or b.seq + b.count <= from_seq:
                continue
            state, start = b.state, max(from_seq - b.seq, 0)
            if state.find(B_READY, start) < 0:
                continue
            items = self._items(b)
            seq, origin, first = b.seq, b.origin, b.first
            for i in range(start, b.count):
                if state[i] == B_READY:  # one loop, no call per message: the backlog pages in through here
                    j = 3 * i
                    found.append(make(seq + i, origin + (first + i).to_bytes(8, "big"), queue, items[j], items[j + 1],
                                      0, 0, items[j + 2], None, b))
                    taken += 1
        found.sort(key=_by_seq)
        return found[:limit]

    def purge_done(self, before: float, limit: int = 5000) -> int:
        """Forget acknowledged messages finished before `before` (they leave the deduplication window)."""
        ids = [r[0] for r in self._conn.execute(
            "SELECT id FROM messages WHERE state = 3 AND finished_at < ? ORDER BY seq LIMIT ?", (before, limit))]
        if ids:
            self._conn.executemany("DELETE FROM messages WHERE id = ?", ((i,) for i in ids))
            self._conn.executemany("DELETE FROM history WHERE message_id = ?", ((i,) for i in ids))
        batches = self._conn.execute("SELECT seq, done FROM batches WHERE finished_at < ? LIMIT ?",
                                     (before, max(limit // 10, 1))).fetchall()
        # A batch's moved messages have rows of their own (their history goes with those).
        self._conn.executemany("DELETE FROM batches WHERE seq = ?", ((r[0],) for r in batches))
        return len(ids) + sum(r[1] for r in batches)

    def counts(self) -> dict[str, int]:
        """Messages per state."""
        found = dict(self._conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
        counts = {name: found.get(state, 0) for state, name in STATE_NAMES.items()}
        for b in self._live.values():
            ready, done = b.state.count(B_READY), b.state.count(B_DONE)
            counts["ready"] += ready
            counts["done"] += done
            counts["in-flight"] += b.count - ready - done - b.state.count(B_MOVED)
        counts["done"] += sum(b.state.count(B_DONE) for b in self._dirty.values() if not b.open)
        counts["done"] += int(self._conn.execute(
            "SELECT coalesce(sum(done), 0) FROM batches WHERE finished_at IS NOT NULL").fetchone()[0])
        return counts

    def queue_names(self) -> list[str]:
        """Queues with messages still to deliver."""
        names = {r[0] for r in self._conn.execute("SELECT DISTINCT queue FROM messages WHERE state IN (0, 1, 2)")}
        return sorted(names | {b.queue for b in self._live.values()})

    # -- dead letters ------------------------------------------------------------------

    def dead_letters(self, flt: DeadLetterFilter = DeadLetterFilter(), *, history: bool = False) -> list[MessageRecord]:
        """Dead letters matching `flt`, oldest first; with their histories when asked."""
        where, params = flt.where()
        sql = f"SELECT {_RECORD_COLUMNS} FROM messages WHERE {where} ORDER BY seq"
        if flt.limit is not None:
            sql += f" LIMIT {int(flt.limit)}"
        return [self._record(r, history) for r in self._conn.execute(sql, params).fetchall()]

    def count_dead(self, flt: DeadLetterFilter = DeadLetterFilter()) -> int:
        where, params = flt.where()
        return int(self._conn.execute(f"SELECT COUNT(*) FROM messages WHERE {where}", params).fetchone()[0])

    def record(self, ident: bytes | str) -> MessageRecord | None:
        """Any message the store still knows, by id, or by a unique hex prefix or suffix of at least 8 digits.

        (Ids from one producer share their first 16 digits, so the end is often the short form.)
        """
        if isinstance(ident, str):
            ident = ident.strip().lower()
            if len(ident) < 8 or any(c not in "0123456789abcdef" for c in ident):
                raise ConfigError(f"message id {ident!r}: expected at least 8 hex digits")
            rows = self._conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM messages WHERE lower(hex(id)) LIKE ? OR lower(hex(id)) LIKE ? LIMIT 2",
                (ident + "%", "%" + ident)).fetchall()
            found = [self._record(r, True) for r in rows]
            found += self._batch_records(ident, 2 - len(found))
            if len(found) > 1:
                raise ConfigError(f"message id {ident!r} is ambiguous; give more digits")
            return found[0] if found else None
        rows = self._conn.execute(f"SELECT {_RECORD_COLUMNS} FROM messages WHERE id = ?", (ident,)).fetchall()
        if rows:
            return self._record(rows[0], True)
        counter = int.from_bytes(ident[8:], "big")
        if len(ident) != 16 or counter >= _MAX_COUNTER:
            return None
        found = self._batch_records_where("origin = ? AND first BETWEEN ? AND ?",
                                          (ident[:8], counter - MAX_RUN + 1, min(counter, _MAX_COUNTER)),
                                          lambda first, count: range(counter, counter + 1), 1)
        return found[0] if found else None

    def _batch_records(self, digits: str, limit: int) -> list[MessageRecord]:
        """Up to `limit` batch messages whose hex id starts or ends with `digits` (an origin is 16 digits, a counter 16)."""
        n = len(digits)
        if limit <= 0 or n > 32:
            return []
        found = []
        if n <= 16:  # a prefix of the origin: every message of those batches
            found += self._batch_records_where("lower(hex(origin)) LIKE ?", (digits + "%",),
                                               lambda first, count: range(first, first + count), limit)
        else:  # the whole origin and the counter's first digits
            shift = 4 * (32 - n)
            lo = int(digits[16:], 16) << shift
            hi = min(lo + (1 << shift), _MAX_COUNTER)
            if lo < _MAX_COUNTER:
                found += self._batch_records_where("origin = ? AND first < ? AND first + count > ?",
                                                   (bytes.fromhex(digits[:16]), hi, lo),
                                                   lambda first, count: range(max(first, lo), min(first + count, hi)), limit)
        if n < 16:  # the counter's last digits
            m, v = 16 ** n, int(digits, 16)
            found += self._batch_records_where("first + ((? - first) % ? + ?) % ? < first + count", (v, m, m, m),
                                               lambda first, count: range(first + (v - first) % m, first + count, m),
                                               limit)
        elif (counter := int(digits[-16:], 16)) < _MAX_COUNTER:  # the whole counter, and the origin's last digits
            found += self._batch_records_where(
                "lower(hex(origin)) LIKE ? AND first BETWEEN ? AND ?",
                ("%" + digits[:-16], counter - MAX_RUN + 1, min(counter, _MAX_COUNTER)),
                lambda first, count: range(counter, counter + 1) if first <= counter < first + count else range(0),
                limit)
        unique = {r.seq: r for r in found}  # a prefix and a suffix can both name the same message
        return list(unique.values())[:limit]

    def _batch_records_where(self, where: str, params: Sequence[Any],
                             counters: Callable[[int, int], range], limit: int) -> list[MessageRecord]:
        """Records of the messages `counters(first, count)` names in each batch row matching `where` (moved ones are
        rows of their own), up to `limit`."""
        found: list[MessageRecord] = []
        if limit <= 0:
            return found
        for seq, queue, origin, first, count, received, finished, state, items in self._conn.execute(
                f"SELECT seq, queue, origin, first, count, received_at, finished_at, state, "
                f"(SELECT items FROM batch_items WHERE batch_items.seq = batches.seq) FROM batches "
                f"WHERE {where} ORDER BY seq", params):
            live = self._live.get(seq) or self._dirty.get(seq)
            if live is not None:
                state, finished = live.state, live.finished_at
            unpacked = msgpack.unpackb(items) if items is not None else None
            for c in counters(first, count):
                i = c - first
                if not 0 <= i < count or state[i] == B_MOVED:
                    continue
                mark = state[i]
                name = STATE_NAMES[READY if mark == B_READY else DONE if mark == B_DONE else INFLIGHT]
                header = unpacked[3 * i] if unpacked is not None else None
                body = unpacked[3 * i + 1] if unpacked is not None and mark != B_DONE else None
                ident = origin + c.to_bytes(8, "big")
                hist = self._history(ident)
                found.append(MessageRecord(seq + i, ident, queue, name, 0 if mark == B_READY else 1, received,
                                           finished if mark == B_DONE else None, None, None, header, body, hist))
                if len(found) >= limit:
                    return found
        return found

    def _history(self, ident: bytes) -> tuple[Attempt, ...]:
        return tuple(Attempt(*h) for h in self._conn.execute(
            "SELECT attempt, at, worker, outcome, error_type, error_message, traceback FROM history "
            "WHERE message_id = ? ORDER BY rowid", (ident,)))

    def _record(self, row: Sequence[Any], history: bool) -> MessageRecord:
        seq, id_, queue, state, attempts, received, finished, reason, etype, header, body = row
        hist = self._history(id_) if history else ()
        return MessageRecord(seq, id_, queue, STATE_NAMES[state], attempts, received, finished, reason, etype, header, body, hist)

    def replay(self, flt: DeadLetterFilter, now: float) -> list[Entry]:
        """Send matching dead letters back to their queues with a fresh attempt budget; their history stays."""
        where, params = flt.where()
        sql = f"SELECT seq, id, queue, header, body, attempts, budget_base, expires_at FROM messages WHERE {where} ORDER BY seq"
        if flt.limit is not None:
            sql += f" LIMIT {int(flt.limit)}"
        entries = [Entry(*r) for r in self._conn.execute(sql, params).fetchall()]
        for e in entries:
            e.budget_base = e.attempts
            e.expires_at = None
        self._conn.executemany(
            "UPDATE messages SET state = 0, budget_base = attempts, available_at = ?, expires_at = NULL, "
            "reason = NULL, finished_at = NULL WHERE seq = ?", ((now, e.seq) for e in entries))
        self.add_history((e.id, e.attempts, now, None, "replayed", None, None, None) for e in entries)
        return entries

    def purge(self, flt: DeadLetterFilter) -> int:
        """Delete matching dead letters and their histories for good."""
        where, params = flt.where()
        sql = f"SELECT id FROM messages WHERE {where} ORDER BY seq"
        if flt.limit is not None:
            sql += f" LIMIT {int(flt.limit)}"
        ids = [r[0] for r in self._conn.execute(sql, params)]
        self._conn.executemany("DELETE FROM messages WHERE id = ?", ((i,) for i in ids))
        self._conn.executemany("DELETE FROM history WHERE message_id = ?", ((i,) for i in ids))
        return len(ids)

    def integrity_check(self) -> str:
        """SQLite's own verdict on the file ("ok" when sound)."""
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])


class StoreLock:
    """An exclusive advisory lock beside the store file: one writer (a sidecar or an offline replay) at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(str(path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        store = self.path.with_name(self.path.name[: -len(".lock")])
        if not store.parent.is_dir():
            raise ConfigError(f"store {store}: directory {store.parent} does not exist")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"store {store}: cannot create its lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreError(f"store {str(self.path)[:-5]} is in use by {holder}; stop it, or talk to it "
                             "over its control endpoint (--endpoint)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
