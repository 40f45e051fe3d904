"""Reliable delivery end to end, with real processes: sidecar, workers and producers killed where failure is the point.

Each scenario reports lost and duplicated messages and asserts on them. Workers log every
message they handle before acknowledging it (tests/reliable_actors.py).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from zfabric.errors import Unconfirmed
from zfabric.patterns.reliable import ReliableProducer
from zfabric.sidecar.client import SidecarClient
from zfabric.sidecar.store import DeadLetterFilter, Store

from .conftest import Processes, Sidecars, wait_until
from .reliable_actors import read_logs

pytestmark = pytest.mark.timeout(180)


def start_worker(processes: Processes, endpoint: str, log: Path, *args: str) -> object:
    proc = processes.python("-m", "tests.reliable_actors", "worker", endpoint, str(log), *args)
    processes.wait_line(proc, r"worker ready")
    return proc


def processed(logs: list[Path]) -> Counter[str]:
    return Counter(row[0] for row in read_logs(logs))


def report(expected: set[str], seen: Counter[str]) -> tuple[int, int]:
    """(lost, duplicated) of `expected` ids given what the workers logged."""
    lost = len(expected - set(seen))
    dup = sum(n - 1 for i, n in seen.items() if i in expected and n > 1)
    print(f"expected={len(expected)} processed={len(set(seen) & expected)} lost={lost} duplicated={dup}")
    return lost, dup


EMPTY = {"ready": 0, "delayed": 0, "in-flight": 0, "done": 0, "dead": 0}


def full_stats(endpoint: str) -> dict:
    with SidecarClient(endpoint, timeout=5.0) as c:
        return c.stats()


def stats(endpoint: str) -> dict[str, int]:
    return full_stats(endpoint)["counters"]


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_killing_a_worker_loses_nothing(face: str, tmp_path: Path, sidecars: Sidecars, processes: Processes) -> None:
    """2 workers, 10,000 messages, window 100; kill -9 one after ~1,000: all processed, duplicates <= window."""
    sc = sidecars.start(tmp_path / "q.db")
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    flags = ["--asyncio"] if face == "asyncio" else []
    victim = start_worker(processes, sc.endpoint, logs[0], "--window", "100", "--delay", "0.0002", *flags)
    start_worker(processes, sc.endpoint, logs[1], "--window", "100", "--delay", "0.0002", *flags)
    with ReliableProducer(sc.endpoint, "orders", timeout=60) as producer:
        sent: list[str] = []
        feeder = threading.Thread(target=lambda: sent.extend(e.id_hex for e in producer.send_many({"n": i} for i in range(10_000))))
        feeder.start()
        assert wait_until(lambda: len(processed(logs[:1])) >= 1000, timeout=60)
        victim.kill()  # type: ignore[attr-defined]
        feeder.join(90)
        assert len(sent) == 10_000
    assert wait_until(lambda: set(sent) <= set(processed(logs)), timeout=60)
    lost, dup = report(set(sent), processed(logs))
    assert lost == 0
    assert dup <= 100
    assert stats(sc.endpoint)["leases_expired"] >= 1
    assert wait_until(lambda: full_stats(sc.endpoint)["stored"] == {**EMPTY, "done": 10_000}, timeout=10, interval=0.3), \
        "every message is recorded as acknowledged once, nothing dead or pending"


def test_sidecar_killed_five_times_loses_no_confirmed_message(tmp_path: Path, sidecars: Sidecars, processes: Processes) -> None:
    """kill -9 the sidecar mid-stream and restart it, 5 times: every confirmed message is processed,
    no attempt number is handed out twice, and the store passes integrity_check."""
    store = tmp_path / "q.db"
    endpoint = f"ipc://{tmp_path}/sidecar"
    sc = sidecars.start(store, endpoint=endpoint)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    start_worker(processes, endpoint, logs[0], "--delay", "0.0005")
    start_worker(processes, endpoint, logs[1], "--delay", "0.0005")
    confirmed: list[str] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with ReliableProducer(endpoint, "orders", timeout=60, resend_after=0.5) as producer:
                for chunk in range(10):
                    producer.send_many(({"n": chunk * 500 + i} for i in range(500)),
                                       on_confirm=lambda env: confirmed.append(env.id_hex))
        except BaseException as exc:
            errors.append(exc)

    feeder = threading.Thread(target=produce)
    feeder.start()
    for _ in range(5):
        target = len(confirmed) + 400
        assert wait_until(lambda t=target: len(confirmed) >= t or not feeder.is_alive(), timeout=60)
        sc.kill()
        sc = sidecars.start(store, endpoint=endpoint)
    feeder.join(120)
    assert not errors, errors
    assert len(confirmed) == 5000
    assert wait_until(lambda: set(confirmed) <= set(processed(logs)), timeout=60)
    lost, dup = report(set(confirmed), processed(logs))
    assert lost == 0
    assert dup <= 5 * 2 * 100, "only messages in flight at each crash (5 crashes x 2 workers x window) may run twice"
    attempts: dict[str, list[int]] = {}
    for ident, attempt, _, _ in read_logs(logs):
        attempts.setdefault(ident, []).append(attempt)
    repeated = {i: a for i, a in attempts.items() if len(a) != len(set(a))}
    assert not repeated, f"an attempt number was handed out twice: {list(repeated.items())[:3]}"
    sc.stop()
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        interrupted = db.execute("SELECT count(*) FROM history WHERE outcome = 'interrupted'").fetchone()[0]
    assert interrupted >= 1, "deliveries cut off by a crash are recorded in the history"
    on_file = Store(store)
    try:
        records = {i: on_file.record(bytes.fromhex(i)) for i in attempts}
    finally:
        on_file.close()
    assert all(r is not None for r in records.values()), "the store knows every message"
    behind = [i for i, a in attempts.items() if records[i].attempts < max(a)]  # type: ignore[union-attr]
    assert not behind, "the store's attempt count went backwards"


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_killing_the_producer_mid_batch(face: str, tmp_path: Path, sidecars: Sidecars, processes: Processes) -> None:
    """kill -9 the producer mid-batch: every message it saw confirmed is processed."""
    sc = sidecars.start(tmp_path / "q.db")
    logs = [tmp_path / "w.log"]
    start_worker(processes, sc.endpoint, logs[0])
    args = ["--asyncio"] if face == "asyncio" else []
    proc = processes.python("-m", "tests.reliable_actors", "producer", sc.endpoint, "50000", *args)
    confirmed: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("confirmed "):
                confirmed.append(line.split()[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_until(lambda: len(confirmed) >= 2000, timeout=60)
    proc.kill()
    proc.wait(5)
    reader.join(5)
    assert len(confirmed) < 50_000, "the producer finished before it was killed; the test proves nothing"
    assert wait_until(lambda: set(confirmed) <= set(processed(logs)), timeout=60)
    lost, dup = report(set(confirmed), processed(logs))
    assert lost == 0 and dup == 0


def test_unconfirmed_messages_are_reported_and_resend_without_duplicates(tmp_path: Path, sidecars: Sidecars,
                                                                        processes: Processes) -> None:
    """The sidecar dies mid-batch: send_many raises Unconfirmed listing exactly what was not confirmed;
    resending those (same ids) after a restart delivers each message once."""
    store, endpoint = tmp_path / "q.db", f"ipc://{tmp_path}/sidecar"
    sc = sidecars.start(store, endpoint=endpoint)
    logs = [tmp_path / "w.log"]
    start_worker(processes, endpoint, logs[0])
    seen: list[str] = []
    with ReliableProducer(endpoint, "orders", timeout=2.0, resend_after=0.3) as producer:
        killer = threading.Thread(target=lambda: wait_until(lambda: len(seen) >= 1000, timeout=30) and sc.kill())
        killer.start()
        with pytest.raises(Unconfirmed) as info:
            producer.send_many(({"n": i} for i in range(20_000)), on_confirm=lambda e: seen.append(e.id_hex))
        killer.join(10)
        exc = info.value
        assert len(exc.confirmed) + len(exc.unconfirmed) == 20_000
        assert {e.id_hex for e in exc.confirmed} == set(seen)
        assert not {e.id for e in exc.confirmed} & {e.id for e in exc.unconfirmed}
        print(f"confirmed before the crash {len(exc.confirmed)}, unconfirmed {len(exc.unconfirmed)}")
        sidecars.start(store, endpoint=endpoint)
        producer.send_envelopes(exc.unconfirmed, timeout=30)
    everything = {e.id_hex for e in exc.confirmed} | {e.id_hex for e in exc.unconfirmed}
    assert wait_until(lambda: everything <= set(processed(logs)), timeout=60)
    lost, dup = report(everything, processed(logs))
    assert lost == 0
    assert dup <= 100, "only messages in flight to the worker at the crash may run twice"


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_poison_message_is_dead_lettered_after_max_attempts_without_stalling(face: str, tmp_path: Path, sidecars: Sidecars,
                                                                           processes: Processes) -> None:
    """One poison message among 10,000, max attempts 5: delivered exactly 5 times, then dead-lettered with
    all 5 attempts recorded; the other 9,999 are processed, some of them while the poison waits."""
    sc = sidecars.start(tmp_path / "q.db", args=("--max-attempts", "5", "--backoff-base", "0.2", "--backoff-cap", "1"))
    logs = [tmp_path / "w.log"]
    start_worker(processes, sc.endpoint, logs[0], "--poison", "0", *(["--asyncio"] if face == "asyncio" else []))
    with ReliableProducer(sc.endpoint, "orders", timeout=60) as producer:
        envs = producer.send_many({"n": i} for i in range(10_000))
    poison = envs[0].id_hex
    assert wait_until(lambda: stats(sc.endpoint)["dead_lettered"] == 1, timeout=60)
    rows = read_logs(logs)
    poison_rows = [i for i, row in enumerate(rows) if row[0] == poison]
    assert [rows[i][1] for i in poison_rows] == [1, 2, 3, 4, 5], "delivered exactly 5 times, attempts 1..5"
    between = {row[0] for row in rows[poison_rows[0] + 1: poison_rows[1]]}
    assert between, "no other message was handled while the poison message waited for its retry"
    others = {e.id_hex for e in envs[1:]}
    assert wait_until(lambda: others <= set(processed(logs)), timeout=60)
    lost, dup = report(others, processed(logs))
    assert lost == 0 and dup == 0
    with SidecarClient(sc.endpoint) as client:
        [dead] = client.dead_letters(DeadLetterFilter(queue="orders"), history=True)
    assert dead.id.hex() == poison and dead.reason == "max-attempts" and dead.error_type == "ValueError"
    assert [a.attempt for a in dead.history] == [1, 2, 3, 4, 5]
    assert all(a.outcome == "nack" and "poison message 0" in (a.error_message or "") for a in dead.history)
    assert all(a.traceback and "ValueError" in a.traceback and a.worker for a in dead.history)
    assert dead.envelope is not None and dead.envelope.body == {"n": 0}
    assert dead.envelope.attempt == 1, "the dead letter keeps the original envelope unchanged"


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_stopped_worker_loses_its_lease_and_late_acks_are_ignored(face: str, tmp_path: Path, sidecars: Sidecars,
                                                                 processes: Processes) -> None:
    """SIGSTOP a worker: detected within 5 s, its messages go to the other worker; after SIGCONT its acks
    are ignored and counted."""
    sc = sidecars.start(tmp_path / "q.db", args=("--lease-timeout", "3"))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    flags = ["--asyncio"] if face == "asyncio" else []
    frozen = start_worker(processes, sc.endpoint, logs[0], "--delay", "0.005", "--window", "20", *flags)
    start_worker(processes, sc.endpoint, logs[1], "--delay", "0.005", "--window", "20", *flags)
    with ReliableProducer(sc.endpoint, "orders") as producer:
        envs = producer.send_many({"n": i} for i in range(600))
    assert wait_until(lambda: len(processed(logs[:1])) >= 20, timeout=30)
    os.kill(frozen.pid, signal.SIGSTOP)  # type: ignore[attr-defined]
    stopped_at = time.monotonic()
    assert wait_until(lambda: stats(sc.endpoint)["leases_expired"] >= 1, timeout=10, interval=0.1)
    detected = time.monotonic() - stopped_at
    print(f"stopped worker detected after {detected:.2f} s")
    assert detected <= 5.0
    ids = {e.id_hex for e in envs}
    assert wait_until(lambda: ids <= set(processed(logs)), timeout=60), "the stopped worker's messages were not redelivered"
    os.kill(frozen.pid, signal.SIGCONT)  # type: ignore[attr-defined]
    assert wait_until(lambda: stats(sc.endpoint)["late_acks"] >= 1, timeout=15)
    lost, dup = report(ids, processed(logs))
    assert lost == 0 and dup <= 20
    assert wait_until(lambda: full_stats(sc.endpoint)["stored"]["done"] == 600, timeout=10, interval=0.3), \
        "every message is recorded as acknowledged once (store counts refresh at most once a second)"


def test_replay_after_the_fix_empties_the_dead_letter_queue(tmp_path: Path, sidecars: Sidecars, processes: Processes) -> None:
    """Messages dead-lettered by a bug are replayed (CLI) once the handler is fixed: all processed, DLQ empty,
    and each record shows the failures, the replay and the final ack."""
    sc = sidecars.start(tmp_path / "q.db", args=("--max-attempts", "2", "--backoff-base", "0.01"))
    flag = tmp_path / "bug"
    flag.touch()
    logs = [tmp_path / "w.log"]
    bad = [3, 14, 15, 92, 65]
    start_worker(processes, sc.endpoint, logs[0], "--fail-flag", str(flag), *[f"--poison={n}" for n in bad])
    with ReliableProducer(sc.endpoint, "orders") as producer:
        envs = producer.send_many({"n": i} for i in range(100))
    assert wait_until(lambda: stats(sc.endpoint)["dead_lettered"] == 5, timeout=30)
    flag.unlink()  # the fix is deployed
    proc = processes.zfabric("dlq", "replay", "--endpoint", sc.endpoint, "--queue", "orders", "--json")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"replayed": 5' in out
    ids = {e.id_hex for e in envs}
    assert wait_until(lambda: ids <= set(processed(logs)) and stats(sc.endpoint)["acked"] == 100, timeout=30)
    with SidecarClient(sc.endpoint) as client:
        assert client.count() == 0
        record = client.record(envs[3].id)
    assert record is not None and record.state == "done"
    assert [(a.attempt, a.outcome) for a in record.history] == [(1, "nack"), (2, "nack"), (2, "replayed"), (3, "ack")]


def test_expired_message_is_dead_lettered_without_reaching_a_handler(tmp_path: Path, sidecars: Sidecars,
                                                                    processes: Processes) -> None:
    sc = sidecars.start(tmp_path / "q.db")
    logs = [tmp_path / "w.log"]
    start_worker(processes, sc.endpoint, logs[0])
    with ReliableProducer(sc.endpoint, "orders") as producer:
        late = producer.envelope({"n": 1}, ttl=60).replace(deadline=time.time() - 1)
        fresh = producer.envelope({"n": 2}, ttl=60)
        producer.send_envelopes([late, fresh])
    assert wait_until(lambda: fresh.id_hex in processed(logs), timeout=30)
    assert wait_until(lambda: stats(sc.endpoint)["expired"] == 1, timeout=10)
    assert late.id_hex not in processed(logs)
    with SidecarClient(sc.endpoint) as client:
        record = client.record(late.id)
    assert record is not None and record.state == "dead" and record.reason == "expired"
    assert record.attempts == 0 and record.history == ()
