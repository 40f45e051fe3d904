"""The sidecar's durable state in SQLite (WAL): messages, their attempt history, the dead-letter queue.

One writer: the sidecar thread that owns the connection (a lock file keeps a second
sidecar, or an offline `zfabric dlq replay`, from writing at the same time). Callers group
many changes into one transaction (`begin`/`commit`), which is what makes durable
confirms cheap: one fsync covers every message of a pass. docs/reliability.md says what
each `synchronous` setting survives.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import codec
from ..envelope import Envelope
from ..errors import ConfigError, DecodeError, StoreError

READY, DELAYED, INFLIGHT, DONE, DEAD = 0, 1, 2, 3, 4
STATE_NAMES = {READY: "ready", DELAYED: "delayed", INFLIGHT: "in-flight", DONE: "done", DEAD: "dead"}
SCHEMA_VERSION = 1
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
"""


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

    @property
    def budget_used(self) -> int:
        """Deliveries since the message last got a fresh budget (arrival or replay)."""
        return self.attempts - self.budget_base


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
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(f"store {self.path}: schema version {row[0]}, this zfabric reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc
        self._in_tx = False
        self._next_seq = int(self._conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM messages").fetchone()[0])

    # -- transactions ------------------------------------------------------------------

    def begin(self) -> None:
        """Start a write transaction; every change until commit() becomes durable together."""
        self._conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True

    def commit(self) -> None:
        """Make the transaction durable (per the synchronous setting); only then may anything be confirmed."""
        self._conn.execute("COMMIT")
        self._in_tx = False

    def rollback(self) -> None:
        if self._in_tx:
            try:
                self._conn.execute("ROLLBACK")
            finally:
                self._in_tx = False
                self._next_seq = int(self._conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM messages").fetchone()[0])

    def close(self) -> None:
        self.rollback()
        self._conn.close()

    # -- the sidecar's hot path --------------------------------------------------------

    def reserve(self, ids: Sequence[bytes]) -> list[int | None]:
        """A sequence number for each id not stored yet, None for a known one (a resend) or a repeat in `ids`.

        The rows themselves are written by insert(), later in the same transaction, once the
        caller knows whether each message went straight out to a worker.
        """
        known: set[bytes] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            known.update(r[0] for r in self._conn.execute(
                f"SELECT id FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        seqs: list[int | None] = []
        for ident in ids:
            if ident in known:
                seqs.append(None)
                continue
            known.add(ident)
            seqs.append(self._next_seq)
            self._next_seq += 1
        return seqs

    def insert(self, entries: Sequence[Entry], received_at: float) -> None:
        """Write reserved messages: ready, or already out with a worker (attempt counted) if delivered in this pass."""
        self._conn.executemany(
            "INSERT INTO messages (seq, id, queue, state, attempts, available_at, received_at, expires_at, worker, header, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.seq, e.id, e.queue, INFLIGHT if e.attempts else READY, e.attempts, received_at, received_at,
              e.expires_at, e.worker, e.header, e.body) for e in entries])

    def mark_delivered(self, rows: Iterable[tuple[int, str | None, int]]) -> None:
        """(attempts, worker, seq) rows: these messages are now out with a worker, attempt counted."""
        self._update_grouped("state = 2, attempts = ?, worker = ?", ((r[:2], r[2]) for r in rows))

    def mark_done(self, rows: Iterable[tuple[float, int]]) -> None:
        """(finished_at, seq) pairs: acknowledged. The body is dropped; the id stays for deduplication."""
        self._update_grouped("state = 3, finished_at = ?, body = NULL", (((r[0],), r[1]) for r in rows))

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

    def mark_delayed(self, seq: int, available_at: float) -> None:
        self._conn.execute("UPDATE messages SET state = 1, available_at = ? WHERE seq = ?", (available_at, seq))

    def mark_dead(self, seq: int, reason: str, error_type: str | None, at: float) -> None:
        self._conn.execute("UPDATE messages SET state = 4, reason = ?, error_type = ?, finished_at = ? WHERE seq = ?",
                           (reason, error_type, at, seq))

    def add_history(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """(message_id, attempt, at, worker, outcome, error_type, error_message, traceback) rows."""
        self._conn.executemany("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def recover(self) -> list[tuple[float, Entry]]:
        """At start: messages that were out with workers are ready again; returns the delayed ones with their due time.

        Each of those deliveries gets a history line: its outcome never reached the store.
        """
        self.add_history(self._conn.execute(
            "SELECT id, attempts, ?, worker, 'interrupted', 'SidecarRestart', "
            "'the sidecar stopped while this delivery was out; its outcome is unknown', NULL "
            "FROM messages WHERE state = 2", (time.time(),)).fetchall())
        self._conn.execute("UPDATE messages SET state = 0 WHERE state = 2")
        rows = self._conn.execute(
            "SELECT available_at, seq, id, queue, header, body, attempts, budget_base, expires_at "
            "FROM messages WHERE state = 1 ORDER BY available_at").fetchall()
        return [(r[0], Entry(*r[1:])) for r in rows]

    def load_ready(self, queue: str, from_seq: int, limit: int) -> list[Entry]:
        """Ready messages of `queue` from `from_seq` on, oldest first (paging the backlog into memory)."""
        rows = self._conn.execute(
            "SELECT seq, id, queue, header, body, attempts, budget_base, expires_at FROM messages "
            "WHERE state = 0 AND queue = ? AND seq >= ? ORDER BY seq LIMIT ?", (queue, from_seq, limit)).fetchall()
        return [Entry(*r) for r in rows]

    def purge_done(self, before: float, limit: int = 5000) -> int:
        """Forget acknowledged messages finished before `before` (they leave the deduplication window)."""
        ids = [r[0] for r in self._conn.execute(
            "SELECT id FROM messages WHERE state = 3 AND finished_at < ? ORDER BY seq LIMIT ?", (before, limit))]
        if ids:
            self._conn.executemany("DELETE FROM messages WHERE id = ?", ((i,) for i in ids))
            self._conn.executemany("DELETE FROM history WHERE message_id = ?", ((i,) for i in ids))
        return len(ids)

    def counts(self) -> dict[str, int]:
        """Messages per state."""
        found = dict(self._conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
        return {name: found.get(state, 0) for state, name in STATE_NAMES.items()}

    def queue_names(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT DISTINCT queue FROM messages WHERE state IN (0, 1, 2)")]

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
            if len(rows) > 1:
                raise ConfigError(f"message id {ident!r} is ambiguous; give more digits")
        else:
            rows = self._conn.execute(f"SELECT {_RECORD_COLUMNS} FROM messages WHERE id = ?", (ident,)).fetchall()
        return self._record(rows[0], True) if rows else None

    def _record(self, row: Sequence[Any], history: bool) -> MessageRecord:
        seq, id_, queue, state, attempts, received, finished, reason, etype, header, body = row
        hist: tuple[Attempt, ...] = ()
        if history:
            hist = tuple(Attempt(*h) for h in self._conn.execute(
                "SELECT attempt, at, worker, outcome, error_type, error_message, traceback FROM history "
                "WHERE message_id = ? ORDER BY rowid", (id_,)))
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
