"""`zfabric sidecar` and `zfabric dlq`, run as users run them, against a running sidecar and a stopped one's store."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zfabric.envelope import Envelope
from zfabric.patterns.reliable import ReliableProducer
from zfabric.patterns.worker import Worker
from zfabric.sidecar.policy import RetryPolicy
from zfabric.sidecar.service import Sidecar

from .conftest import ROOT, Processes, wait_until


def zf(*args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zfabric", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, input=input)


@pytest.fixture
def dead_letters(tmp_path: Path) -> Iterator[tuple[Sidecar, list[Envelope]]]:
    """A running sidecar holding 6 dead letters (4 KeyError on queue orders, 2 ValueError on queue mail)."""
    sc = Sidecar(tmp_path / "s.db", {"orders": RetryPolicy(max_attempts=1), "mail": RetryPolicy(max_attempts=1)},
                 endpoint="tcp://127.0.0.1:0").start()

    def fail(env: Envelope) -> None:
        raise (KeyError if env.topic == "orders" else ValueError)(f"cannot handle {env.body}")

    workers = [Worker(sc.endpoint, q, fail, heartbeat=0.3).start() for q in ("orders", "mail")]
    envs = []
    for queue, n in (("orders", 4), ("mail", 2)):
        with ReliableProducer(sc.endpoint, queue) as producer:
            envs += producer.send_many({"n": i} for i in range(n))
    assert wait_until(lambda: sc.stats.dead_lettered == 6)
    for w in workers:
        w.close()
    yield sc, envs
    sc.stop()


def test_dlq_list_show_export_against_a_running_sidecar(dead_letters: tuple[Sidecar, list[Envelope]], tmp_path: Path) -> None:
    sc, envs = dead_letters
    listed = zf("dlq", "list", "-e", sc.endpoint, "--queue", "orders", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == [e.id_hex for e in envs[:4]]
    assert {r["reason"] for r in rows} == {"max-attempts"} and {r["error_type"] for r in rows} == {"KeyError"}
    table = zf("dlq", "list", "-e", sc.endpoint, "--error-type", "ValueError")
    assert "2 shown of 2" in table.stdout and envs[4].id_hex in table.stdout
    shown = zf("dlq", "show", envs[0].id_hex, "-e", sc.endpoint, "--json")
    record = json.loads(shown.stdout)
    assert record["envelope"]["body"] == {"n": 0} and record["state"] == "dead"
    assert record["history"][0]["error_type"] == "KeyError" and "cannot handle" in record["history"][0]["error_message"]
    human = zf("dlq", "show", envs[0].id_hex, "-e", sc.endpoint)
    assert "KeyError" in human.stdout and "Traceback" in human.stdout
    out = tmp_path / "dead.jsonl"
    exported = zf("dlq", "export", "-e", sc.endpoint, "-o", str(out))
    assert exported.returncode == 0 and "exported 6" in exported.stderr
    assert len(out.read_text().splitlines()) == 6
    missing = zf("dlq", "show", "ffffffffffffffff", "-e", sc.endpoint)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_dlq_replay_with_rate_limit_and_purge(dead_letters: tuple[Sidecar, list[Envelope]]) -> None:
    sc, envs = dead_letters
    replayed = zf("dlq", "replay", "-e", sc.endpoint, "--queue", "mail", "--rate", "20", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["replayed"] == 2
    assert sc.stats.replayed == 2
    refused = zf("dlq", "purge", "-e", sc.endpoint, input="n\n")
    assert refused.returncode == 1, "purge asks first"
    purged = zf("dlq", "purge", "-e", sc.endpoint, "--error-type", "KeyError", "--yes")
    assert "purged 4" in purged.stdout
    assert zf("dlq", "list", "-e", sc.endpoint, "--json").stdout == ""


def test_dlq_against_the_store_file_of_a_stopped_sidecar(dead_letters: tuple[Sidecar, list[Envelope]]) -> None:
    sc, envs = dead_letters
    store = str(sc.config.store)
    busy = zf("dlq", "replay", "--store", store)
    assert busy.returncode == 1 and "in use by pid" in busy.stderr and "--endpoint" in busy.stderr
    sc.stop()
    listed = zf("dlq", "list", "--store", store, "--json")
    assert len(listed.stdout.splitlines()) == 6
    replayed = zf("dlq", "replay", "--store", store, "--id", envs[0].id_hex)
    assert "replayed 1 message(s); they wait in the store until the sidecar starts" in replayed.stdout
    assert len(zf("dlq", "list", "--store", store, "--json").stdout.splitlines()) == 5


def test_sidecar_command_and_stats(tmp_path: Path, processes: Processes) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("store: s.db\nendpoint: tcp://127.0.0.1:0\nqueues:\n  orders: {max_attempts: 2}\n")
    proc = processes.zfabric("sidecar", "--config", str(config), "--no-live")
    endpoint = processes.wait_line(proc, r"zfabric sidecar ready endpoint=(\S+)").group(1)
    with ReliableProducer(endpoint, "orders") as producer:
        producer.send_many(range(5))
    stats = zf("sidecar", "stats", "-e", endpoint, "--json")
    snap = json.loads(stats.stdout)
    assert snap["counters"]["received"] == 5 and snap["stored"]["ready"] == 5
    assert snap["queues"]["orders"]["policy"]["max_attempts"] == 2
    table = zf("sidecar", "stats", "-e", endpoint)
    assert "received" in table.stdout and "stored ready" in table.stdout
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "zfabric sidecar counters received=5" in out


@pytest.mark.parametrize("args, code, message", [
    (("sidecar", "--store", "x.db"), 1, "give at least one --queue"),
    (("sidecar", "--queue", "q", "--store", "/nonexistent/dir/x.db"), 1, "does not exist"),
    (("sidecar", "--queue", "q", "--store", "x.db", "--synchronous", "off"), 1, "synchronous"),
    (("sidecar", "stats", "-e", "tcp://127.0.0.1:1", "--timeout", "0.5"), 3, "did not answer"),
    (("dlq", "list", "--store", "/nonexistent.db"), 1, "no such file"),
    (("dlq", "list", "--store", "x.db", "-e", "tcp://127.0.0.1:1"), 1, "not both"),
    (("dlq", "list", "--since", "yesterday", "-e", "tcp://127.0.0.1:1"), 1, "--since 'yesterday'"),
])
def test_cli_errors_say_what_went_wrong(args: tuple[str, ...], code: int, message: str) -> None:
    done = zf(*args)
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stderr
