"""The sidecar's pure parts: retry policy, ledger decisions, and the store's dead-letter operations."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zfabric import codec
from zfabric.envelope import Envelope, IdSource
from zfabric.errors import ConfigError
from zfabric.sidecar.ledger import Ledger
from zfabric.sidecar.policy import RetryPolicy
from zfabric.sidecar.store import DeadLetterFilter, Entry, Store


@given(st.integers(1, 60), st.floats(0, 10), st.floats(0, 1), st.floats(0, 1))
def test_backoff_grows_to_the_cap_with_bounded_jitter(attempts: int, base: float, jitter: float, r: float) -> None:
    policy = RetryPolicy(backoff_base=base, backoff_cap=max(base, 30.0), jitter=jitter)
    full = min(policy.backoff_cap, base * 2.0 ** (attempts - 1))
    delay = policy.delay(attempts, rand=lambda: r)
    assert full * (1 - jitter) - 1e-9 <= delay <= full + 1e-9


def test_policy_rejects_nonsense() -> None:
    for bad in ({"max_attempts": 0}, {"max_attempts": "5"}, {"backoff_base": -1}, {"jitter": 2},
                {"backoff_base": 10, "backoff_cap": 1}, {"ttl": 0}):
        with pytest.raises(ConfigError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def entry(seq: int, queue: str = "q", expires: float | None = None) -> Entry:
    return Entry(seq, seq.to_bytes(16, "big"), queue, b"h", b"b", 0, 0, expires)


def test_deliveries_respect_each_workers_window_and_share_round_robin() -> None:
    led = Ledger({"q": RetryPolicy()})
    for i in range(1, 11):
        led.add(entry(i))
    led.announce(b"a", b"ra", "a", "q", 3, 0.0)
    led.announce(b"b", b"rb", "b", "q", 3, 0.0)
    out, expired = led.deliveries(time.time())
    assert len(out) == 6 and not expired
    per_worker = {w: sum(1 for lease, _ in out if lease.worker_id == w) for w in (b"a", b"b")}
    assert per_worker == {b"a": 3, b"b": 3}
    assert all(e.attempts == 1 for _, e in out)
    assert led.deliveries(time.time())[0] == [], "no credit left"
    lease, first = out[0]
    assert led.settle(lease.worker_id, first.id, 1) is not None
    assert led.settle(lease.worker_id, first.id, 1) is None, "a second ack of the same delivery is late"
    assert led.stats.late_acks == 1
    assert len(led.deliveries(time.time())[0]) == 1, "one ack frees one credit"


def test_expired_lease_gives_messages_back_first_in_line() -> None:
    led = Ledger({"q": RetryPolicy()}, lease_timeout=3.0)
    for i in range(1, 4):
        led.add(entry(i))
    led.announce(b"a", b"ra", "a", "q", 2, now=100.0)
    out, _ = led.deliveries(time.time())
    assert [e.seq for _, e in out] == [1, 2]
    assert led.expired_leases(now=102.0) == []
    [lost] = led.expired_leases(now=103.5)
    for e in lost.inflight.values():
        led.requeue(e)
    led.announce(b"b", b"rb", "b", "q", 5, now=103.5)
    out, _ = led.deliveries(time.time())
    assert sorted(e.seq for _, e in out) == [1, 2, 3]
    assert {e.seq: e.attempts for _, e in out} == {1: 2, 2: 2, 3: 1}


def test_failure_outcomes() -> None:
    led = Ledger({"q": RetryPolicy(max_attempts=3, backoff_base=1, jitter=0)})
    e = entry(1)
    e.attempts = 1
    assert led.failure(e, 0.0).due == 1.0
    assert led.failure(e, 0.0, retry_after=7).due == 7.0
    assert led.failure(e, 0.0, retryable=False).reason == "not-retryable"
    e.attempts = 3
    assert led.failure(e, 0.0).reason == "max-attempts"
    e.budget_base = 3  # replayed: a fresh budget
    assert not led.failure(e, 0.0).dead
    e.expires_at = 0.5
    assert led.failure(e, 0.0).reason == "expired", "a retry that would come after the deadline is pointless"


def test_expired_messages_are_never_delivered() -> None:
    led = Ledger({"q": RetryPolicy()})
    led.add(entry(1, expires=time.time() - 1))
    led.add(entry(2))
    led.announce(b"a", b"ra", "a", "q", 5, 0.0)
    out, expired = led.deliveries(time.time())
    assert [e.seq for _, e in out] == [2] and [e.seq for e in expired] == [1]


def store_with_dead(path: Path, n: int) -> tuple[Store, list[Envelope]]:
    store = Store(path)
    ids = IdSource()
    envs = []
    store.begin()
    for i in range(n):
        env = Envelope.new({"i": i}, topic="q" if i % 2 else "r").replace(id=ids.next())
        header, body = codec.encode_split(env)
        [seq] = store.reserve([env.id])
        assert seq is not None
        entry = Entry(seq, env.id, env.topic, header, body)
        store.insert([entry], 1000.0 + i)
        entry.attempts, entry.worker = 1, "w/1"
        store.mark_delivered([entry])
        store.add_history([(env.id, 1, 1000.0 + i, "w/1", "nack", "KeyError" if i < 4 else "ValueError", "boom", "tb")])
        store.mark_dead(entry, "max-attempts", "KeyError" if i < 4 else "ValueError", 2000.0 + i)
        envs.append(env)
    store.commit()
    return store, envs


def test_store_filters_replays_and_purges(tmp_path: Path) -> None:
    store, envs = store_with_dead(tmp_path / "s.db", 10)
    assert store.count_dead() == 10
    assert store.count_dead(DeadLetterFilter(queue="q")) == 5
    assert store.count_dead(DeadLetterFilter(error_type="KeyError")) == 4
    assert store.count_dead(DeadLetterFilter(since=2005.0)) == 5
    assert store.count_dead(DeadLetterFilter(until=2002.0)) == 2
    assert store.count_dead(DeadLetterFilter(ids=(envs[0].id, envs[9].id))) == 2
    page = store.dead_letters(DeadLetterFilter(limit=3))
    assert [r.envelope.body["i"] for r in page] == [0, 1, 2]  # type: ignore[union-attr]
    nxt = store.dead_letters(DeadLetterFilter(after_seq=page[-1].seq, limit=3))
    assert [r.envelope.body["i"] for r in nxt] == [3, 4, 5]  # type: ignore[union-attr]
    record = store.record(envs[0].id.hex()[-8:])
    assert record is not None and record.id == envs[0].id and len(record.history) == 1
    assert store.record(envs[1].id) == store.record(envs[1].id.hex())
    with pytest.raises(ConfigError, match="ambiguous"):
        store.record(envs[0].id.hex()[:8])
    store.begin()
    replayed = store.replay(DeadLetterFilter(queue="r"), 3000.0)
    purged = store.purge(DeadLetterFilter(error_type="ValueError"))
    store.commit()
    assert len(replayed) == 5 and all(e.budget_base == 1 for e in replayed)
    assert purged == 3, "the ValueError dead letters still dead after the replay (queue q)"
    assert store.count_dead() == 2
    assert store.counts()["ready"] == 5
    assert store.integrity_check() == "ok"
    store.close()


def test_a_store_that_cannot_use_wal_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Store(tmp_path / "missing" / "s.db")
    with pytest.raises(ConfigError, match="synchronous"):
        Store(tmp_path / "s.db", synchronous="off")
