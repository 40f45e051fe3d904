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
    snap = full_stats(sc.endpoint)
    assert snap["counters"]["leases_expired"] >= 1
    assert snap["stored"]["done"] == 10_000, "every message is recorded as acknowledged once"
    assert snap["stored"]["dead"] == 0
