"""The sidecar's store: runs of messages kept as batch rows, and everything that must still hold for them.

A producer's `send_many` sends ids with consecutive counters; the store keeps such a run as
one row of `batches` with a state byte per message, and gives a message a row of its own
when it needs more (a second attempt, a delay, the dead-letter queue). These tests drive the
store directly, the way the sidecar's passes do, and reopen the file to see what survives.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zfabric import codec
from zfabric.envelope import Envelope, IdSource
from zfabric.errors import ConfigError, StoreError
from zfabric.sidecar.store import MAX_RUN, Entry, Store


@contextmanager
def one_pass(store: Store) -> Iterator[None]:
    """One transaction, as one pass of the sidecar makes it."""
    store.begin()
    yield
    store.commit()


def fresh(store: Store, ids: IdSource, n: int, queue: str = "q") -> list[Entry]:
    """Reserve and insert `n` new messages with consecutive ids, as one PUT of a producer's send_many does."""
    entries = reserved(store, [Envelope.new({"n": i}, topic=queue).replace(id=ids.next()) for i in range(n)])
    store.insert(entries, 1000.0)
    return entries


def reserved(store: Store, envs: list[Envelope]) -> list[Entry]:
    seqs = store.reserve([e.id for e in envs])
    assert None not in seqs
    entries = []
    for env, seq in zip(envs, seqs):
        header, body = codec.encode_split(env)
        entries.append(Entry(seq, env.id, env.topic, header, body))  # type: ignore[arg-type]
    return entries


def table_rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def deliver(store: Store, entries: list[Entry], worker: str = "w/1") -> None:
    for e in entries:
        e.attempts += 1
        e.worker = worker
    store.mark_delivered(entries)


def test_a_run_of_consecutive_ids_is_one_row_and_reads_back_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ids = IdSource()
    with one_pass(store):
        entries = fresh(store, ids, 100)
    assert table_rows(tmp_path / "s.db", "batches") == 1
    assert table_rows(tmp_path / "s.db", "messages") == 0
    assert store.counts()["ready"] == 100
    page = store.load_ready("q", entries[40].seq, 30)
    assert [e.seq for e in page] == [e.seq for e in entries[40:70]]
    assert [codec.decode([e.header, e.body]).body["n"] for e in page] == list(range(40, 70))
    assert [e.id for e in page] == [e.id for e in entries[40:70]]
    assert store.load_ready("other", 0, 10) == []
    store.close()


def test_duplicates_are_found_in_batches_and_within_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ids = IdSource()
    with one_pass(store):
        entries = fresh(store, ids, 50)
        singles = [fresh(store, ids, 1)[0] for _ in range(3)]  # one send each: rows of their own
        foreign = reserved(store, [Envelope.new(i, topic="q").replace(id=b"foreign-%d" % i) for i in range(2)])
        store.insert(foreign, 1000.0)
    assert table_rows(tmp_path / "s.db", "messages") == 5
    with one_pass(store):
        stored = [e.id for e in entries[10:20] + singles + foreign]
        new = [ids.next() for _ in range(3)] + [b"foreign-new"]
        seqs = store.reserve(stored + new)
        assert seqs[:len(stored)] == [None] * len(stored), "a resend of stored messages is a duplicate, batch or row"
        assert None not in seqs[len(stored):]
        assert store.reserve(new) == [None] * len(new), "ids reserved earlier in the same pass are duplicates too"
    store.close()


def test_delivery_ack_failure_and_dead_letter_of_batch_messages(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    ids = IdSource()
    with one_pass(store):
        entries = fresh(store, ids, 10)
    with one_pass(store):
        deliver(store, entries[:6])
    with one_pass(store):
        store.mark_done(entries[:3], 2000.0)
        store.mark_delayed(entries[3], 3000.0)
        store.mark_dead(entries[4], "max-attempts", "KeyError", 2500.0)
        deliver(store, [entries[5]], "w/2")  # a second attempt: it needs a row of its own
    assert store.counts() == {"ready": 4, "delayed": 1, "in-flight": 1, "done": 3, "dead": 1}
    states = {i: store.record(entries[i].id) for i in range(10)}
    assert [(r.state, r.attempts) for r in states.values()] == (  # type: ignore[union-attr]
        [("done", 1)] * 3 + [("delayed", 1), ("dead", 1), ("in-flight", 2)] + [("ready", 0)] * 4)
    dead = store.dead_letters()
    assert [r.id for r in dead] == [entries[4].id] and dead[0].reason == "max-attempts"
    assert dead[0].envelope is not None and dead[0].envelope.body == {"n": 4}
    assert store.record(entries[7].id.hex()[-8:]) == states[7], "a hex suffix finds a batch message"
    store.close()
    reopened = Store(path)
    assert reopened.counts() == {"ready": 4, "delayed": 1, "in-flight": 1, "done": 3, "dead": 1}
    assert [e.seq for e in reopened.load_ready("q", 0, 100)] == [e.seq for e in entries[6:]]
    reopened.close()


def test_hex_forms_of_an_id_find_one_batch_message_or_say_ambiguous(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    ids = IdSource()
    with one_pass(store):
        entries = fresh(store, ids, 300)
    target = entries[123]
    full = target.id.hex()
    for form in (full, full[-8:], full[-16:], full[-20:], full[:24] + full[24:]):
        record = store.record(form)
        assert record is not None and record.id == target.id, form
    with pytest.raises(ConfigError, match="ambiguous"):
        store.record(full[:16])  # the producer's origin: every message of the batch
    assert store.record("00" * 16) is None
    store.close()


def test_a_crash_with_first_attempts_out_recovers_them_with_the_attempt_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    ids = IdSource()
    with one_pass(store):
        entries = fresh(store, ids, 20)
        deliver(store, entries[:8])
    with one_pass(store):
        store.mark_done(entries[:2], 2000.0)
    store.begin()
    store.mark_done(entries[2:4], 2001.0)  # never committed: the crash comes first
    store._conn.close()  # what a kill -9 leaves: the last transaction rolled back by SQLite

    store = Store(path)
    with one_pass(store):
        assert store.recover() == []
    ready = store.load_ready("q", 0, 100)
    assert [e.seq for e in ready] == [e.seq for e in entries[2:]]
    assert [e.attempts for e in ready] == [1] * 6 + [0] * 12, "first attempts cut off by the crash stay counted"
    record = store.record(entries[2].id)
    assert record is not None and record.attempts == 1
    assert [(a.outcome, a.worker) for a in record.history] == [("interrupted", "w/1")]
    assert store.counts()["done"] == 2
    store.close()


def test_a_finished_batch_drops_its_messages_and_leaves_the_dedupe_window(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    ids = IdSource()
    with one_pass(store):
        entries = fresh(store, ids, 30)
        deliver(store, entries)
    with one_pass(store):
        store.mark_done(entries, 2000.0)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT finished_at, done FROM batches").fetchall() == [(2000.0, 30)]
        assert db.execute("SELECT count(*) FROM batch_items").fetchone()[0] == 0, "the messages are dropped"
    assert store.counts()["done"] == 30
    with one_pass(store):
        assert store.reserve([entries[0].id]) == [None], "still known within the window"
    with one_pass(store):
        assert store.purge_done(1999.0) == 0
        assert store.purge_done(2001.0) == 30
        assert store.reserve([entries[0].id]) != [None], "forgotten once the window passed"
    store.close()


def test_runs_break_at_gaps_other_queues_foreign_ids_and_the_row_limit(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    ids = IdSource()

    def run(n: int, queue: str = "q") -> list[Envelope]:
        return [Envelope.new(i, topic=queue).replace(id=ids.next()) for i in range(n)]

    first = run(5)
    ids.next()  # a gap in the counters: a message the sidecar refused, say
    envs = first + run(5) + run(5, "other") + [Envelope.new("x", topic="q").replace(id=b"not sixteen bytes")]
    envs += run(MAX_RUN + 3)
    with one_pass(store):
        entries = reserved(store, envs)
        store.insert(entries, 1000.0)  # one pass's messages, in one call
    assert table_rows(path, "batches") == 5, "5, 5 after the gap, 5 to another queue, the long run in two rows"
    assert table_rows(path, "messages") == 1, "the foreign id"
    assert [e.seq for e in store.load_ready("q", 0, 10_000)] == [e.seq for e in entries if e.queue == "q"]
    assert [e.seq for e in store.load_ready("other", 0, 10)] == [e.seq for e in entries[10:15]]
    assert store.record(b"not sixteen bytes") is not None
    assert store.queue_names() == ["other", "q"]
    store.close()


def test_two_entries_of_one_message_settle_it_once(tmp_path: Path) -> None:
    """The sidecar can briefly hold two entries of one message (a page loaded while a delivery of the same pass
    was not yet written). Whatever both report, the message is settled once: acked twice is done once, moved by
    one and acked by the other is a done row, acked by one and failed by the other stays done."""
    store = Store(tmp_path / "s.db")
    with one_pass(store):
        entries = fresh(store, IdSource(), 6)
    twins = store.load_ready("q", 0, 10)
    assert [t.id for t in twins] == [e.id for e in entries] and all(t.batch is entries[0].batch for t in twins)
    with one_pass(store):
        deliver(store, entries[:3])
        deliver(store, twins[:3], "w/2")
    with one_pass(store):
        store.mark_done([entries[0], twins[0]], 2000.0)
        store.mark_delayed(entries[1], 3000.0)
        store.mark_done([twins[1]], 2000.0)
        store.mark_done([entries[2]], 2000.0)
        store.mark_dead(twins[2], "max-attempts", "ValueError", 2000.0)
    assert [store.record(e.id).state for e in entries[:3]] == ["done", "done", "done"]  # type: ignore[union-attr]
    assert store.counts() == {"ready": 3, "delayed": 0, "in-flight": 0, "done": 3, "dead": 0}
    store.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE messages (seq INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, queue TEXT NOT NULL, state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, budget_base INTEGER NOT NULL DEFAULT 0, available_at REAL NOT NULL,
    received_at REAL NOT NULL, expires_at REAL, finished_at REAL, reason TEXT, error_type TEXT, worker TEXT,
    header BLOB, body BLOB);
CREATE TABLE history (message_id BLOB NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL, worker TEXT,
    outcome TEXT NOT NULL, error_type TEXT, error_message TEXT, traceback TEXT);
INSERT INTO meta VALUES ('schema', 1);
"""


def test_a_version_1_store_is_upgraded_in_place_and_keeps_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    env = Envelope.new({"old": True}, topic="q")
    header, body = codec.encode_split(env)
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO messages (seq, id, queue, state, available_at, received_at, header, body) "
                   "VALUES (7, ?, 'q', 0, 1, 1, ?, ?)", (env.id, header, body))
    store = Store(path)
    [old] = store.load_ready("q", 0, 10)
    assert old.seq == 7 and codec.decode([old.header, old.body]).body == {"old": True}
    with one_pass(store):
        new = fresh(store, IdSource(), 3)
    assert new[0].seq == 8, "sequence numbers go on after the old rows"
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == 2
        db.execute("UPDATE meta SET value = 3 WHERE key = 'schema'")
    with pytest.raises(StoreError, match="schema version 3"):
        Store(path)


class StoreModel(RuleBasedStateMachine):
    """Random passes against the store, checked after each against a plain model of every message.

    Each rule is one pass (one transaction) as the sidecar makes it: messages arrive in runs or
    alone, are delivered, acknowledged, retried, dead-lettered, taken back from a lost worker;
    `crash` drops a pass half done and restarts the store the way the sidecar does. The model
    holds what the store must say of each message (state and attempts, as committed), and
    what the sidecar holds in memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="zf-store-model-")
        self.path = Path(self.tmp.name) / "s.db"
        self.store = Store(self.path, synchronous="normal")
        self.ids = IdSource()
        self.durable: dict[bytes, tuple[str, int, str]] = {}
        """id -> (state, attempts, queue): what the store must report."""
        self.memory: dict[bytes, tuple[str, Entry]] = {}
        """id -> (ready | in-flight | waiting, entry): the sidecar's ledger."""
        self.clock = 1000.0
        self.foreign = 0

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()

    def _pass(self) -> dict[bytes, tuple[str, int, str]]:
        self.clock += 1.0
        self.store.begin()
        return dict(self.durable)

    def _commit(self, view: dict[bytes, tuple[str, int, str]]) -> None:
        self.store.commit()
        self.durable = view

    def _in(self, where: str, n: int) -> list[Entry]:
        picked = sorted((e for state, e in self.memory.values() if state == where), key=lambda e: e.seq)
        return picked[:n]

    @rule(n=st.integers(1, 6), queue=st.sampled_from(["q", "r"]), foreign=st.booleans(), resend=st.integers(0, 3))
    def put(self, n: int, queue: str, foreign: bool, resend: int) -> None:
        view = self._pass()
        envs = []
        for _ in range(n):
            self.foreign += 1
            ident = b"foreign-%d" % self.foreign if foreign else self.ids.next()
            envs.append(Envelope.new({"n": self.foreign}, topic=queue).replace(id=ident))
        known = list(self.durable)[:resend]
        seqs = self.store.reserve([e.id for e in envs] + known)
        assert seqs[n:] == [None] * len(known), "a stored message sent again is a duplicate"
        entries = []
        for env, seq in zip(envs, seqs):
            assert seq is not None
            header, body = codec.encode_split(env)
            entries.append(Entry(seq, env.id, queue, header, body))  # type: ignore[arg-type]
        self.store.insert(entries, self.clock)
        for e in entries:
            view[e.id] = ("ready", 0, queue)
            self.memory[e.id] = ("ready", e)
        self._commit(view)

    @rule(n=st.integers(1, 8), worker=st.sampled_from(["w/1", "w/2", "w/3"]))
    def deliver(self, n: int, worker: str) -> None:
        view = self._pass()
        self._deliver(view, n, worker)
        self._commit(view)

    def _deliver(self, view: dict[bytes, tuple[str, int, str]], n: int, worker: str) -> None:
        out = self._in("ready", n)
        for e in out:
            e.attempts += 1
            e.worker = worker
            self.memory[e.id] = ("in-flight", e)
            view[e.id] = ("in-flight", e.attempts, e.queue)
        self.store.mark_delivered(out)

    @rule(n=st.integers(1, 8))
    def ack(self, n: int) -> None:
        view = self._pass()
        done = self._in("in-flight", n)
        self.store.mark_done(done, self.clock)
        for e in done:
            del self.memory[e.id]
            view[e.id] = ("done", e.attempts, e.queue)
        self._commit(view)

    @rule(n=st.integers(1, 3), dead=st.booleans())
    def fail(self, n: int, dead: bool) -> None:
        view = self._pass()
        for e in self._in("in-flight", n):
            if dead:
                self.store.mark_dead(e, "max-attempts", "ValueError", self.clock)
                del self.memory[e.id]
                view[e.id] = ("dead", e.attempts, e.queue)
            else:
                self.store.mark_delayed(e, self.clock + 5)
                self.memory[e.id] = ("waiting", e)
                view[e.id] = ("delayed", e.attempts, e.queue)
        self._commit(view)

    @rule(n=st.integers(1, 2))
    def expire_unsent(self, n: int) -> None:
        view = self._pass()
        for e in self._in("ready", n):
            self.store.mark_dead(e, "expired", None, self.clock)
            del self.memory[e.id]
            view[e.id] = ("dead", e.attempts, e.queue)
        self._commit(view)

    @rule(n=st.integers(1, 4))
    def lease_lost(self, n: int) -> None:
        """A worker went silent: its messages are ready again in memory; the store still says in flight."""
        for e in self._in("in-flight", n):
            self.memory[e.id] = ("ready", e)

    @rule(n=st.integers(1, 4))
    def retry_due(self, n: int) -> None:
        for e in self._in("waiting", n):
            self.memory[e.id] = ("ready", e)

    @rule(deliver=st.integers(0, 5))
    def crash(self, deliver: int) -> None:
        """A pass half done when the process dies; the sidecar restarts on the same file."""
        view = self._pass()
        self._deliver(view, deliver, "w/9")
        self.store._conn.close()  # what a kill -9 leaves: the open transaction is not in the file
        self.store = Store(self.path, synchronous="normal")
        self.store.begin()
        delayed = self.store.recover()
        self.store.commit()
        self.durable = {i: ("ready" if s == "in-flight" else s, a, q) for i, (s, a, q) in self.durable.items()}
        self.memory = {e.id: ("waiting", e) for _, e in delayed}
        for queue in ("q", "r"):
            self.memory.update((e.id, ("ready", e)) for e in self.store.load_ready(queue, 0, 1_000_000))

    @rule()
    def purge_finished(self) -> None:
        view = self._pass()
        self.store.purge_done(self.clock + 1)
        self.store.commit()
        for ident, (state, _, _) in view.items():
            if state == "done" and self.store.record(ident) is None:
                del self.durable[ident]  # forgotten: out of the dedupe window

    @invariant()
    def the_store_says_what_was_committed(self) -> None:
        for ident, (state, attempts, queue) in self.durable.items():
            record = self.store.record(ident)
            assert record is not None, f"{ident.hex()} ({state}) is lost"
            assert (record.state, record.attempts, record.queue) == (state, attempts, queue), ident.hex()
        expected = {name: 0 for name in ("ready", "delayed", "in-flight", "done", "dead")}
        for state, _, _ in self.durable.values():
            expected[state] += 1
        assert self.store.counts() == expected
        for queue in ("q", "r"):
            ready = sorted(i for i, (s, _, q) in self.durable.items() if s == "ready" and q == queue)
            assert sorted(e.id for e in self.store.load_ready(queue, 0, 1_000_000)) == ready
        assert set(self.store.queue_names()) == {q for s, _, q in self.durable.values() if s in ("ready", "delayed", "in-flight")}

    @invariant()
    def memory_matches_the_store(self) -> None:
        for ident, (where, e) in self.memory.items():
            state, attempts, _ = self.durable[ident]
            assert e.attempts == attempts or where == "ready" and state in ("in-flight", "delayed")


StoreModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_the_store_keeps_every_message_through_random_passes_and_crashes = StoreModel.TestCase
