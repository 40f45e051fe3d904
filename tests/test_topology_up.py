"""`zfabric up` end to end: the shop example with its real services as processes, kill -9 of the
forwarder mid-stream, restart, and publishing that resumes without restarting any service."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from zfabric.topology.fabric import Fabric

from .conftest import ROOT, Processes, free_tcp_ports, wait_until

SERVICES = "topologies/shop/services.py"


def shop_copy(tmp_path: Path, ipc_dir: Path) -> Path:
    """topologies/shop.yaml with free ports instead of its fixed ones and a private status address."""
    text = (ROOT / "topologies" / "shop.yaml").read_text()
    ports = sorted(set(re.findall(r"local:(\d+)\b", text)))
    fresh = dict(zip(ports, map(str, free_tcp_ports(len(ports))), strict=True))
    text = re.sub(r"local:(\d+)\b", lambda m: f"local:{fresh[m.group(1)]}", text)  # all at once: no port rewrites another
    path = tmp_path / "shop.yaml"
    path.write_text(text + f'\ncontrol: "ipc://{ipc_dir}/control"\n')
    return path


class Lines:
    """Reads a child's stdout in a thread: JSON events into `events`, every line into `raw`."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.raw.append(line)
                if line.startswith("{"):
                    self.events.append(json.loads(line))
                self._changed.notify_all()

    def of(self, event: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e["event"] == event]

    def wait(self, predicate: Callable[[Lines], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what}: not seen within {timeout} s; output:\n" + "".join(self.raw[-30:]))
                self._changed.wait(min(left, 0.2))

    def numbers(self, event: str) -> list[int]:
        return [e["n"] for e in self.of(event)]


def status(path: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "zfabric", "status", str(path), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def component(report: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in report["components"] if c["kind"] == kind)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def start_up(processes: Processes, path: Path) -> subprocess.Popen[str]:
    up = processes.zfabric("up", str(path), "--no-live", "--backoff-cap", "1")
    processes.wait_line(up, r"^zfabric up ready ", timeout=30)
    return up


@pytest.mark.timeout(150)
def test_shop_runs_every_pattern_and_survives_a_forwarder_kill(processes: Processes, tmp_path: Path,
                                                               ipc_dir: Path) -> None:
    path = shop_copy(tmp_path, ipc_dir)
    up = start_up(processes, path)
    report = status(path)
    assert {(c["kind"], c["name"], c["state"]) for c in report["components"]} == {
        ("forwarder", "events", "running"), ("sidecar", "orders-store", "running")}

    services: dict[str, Lines] = {}
    for role, *extra in (["fulfilment"], ["pricing"], ["supplier", "supplier-a"], ["supplier", "supplier-b"],
                         ["supplier", "supplier-c"], ["analytics"], ["mailer"]):
        name = extra[0] if extra else role
        services[name] = Lines(processes.python(SERVICES, role, *extra, "--topology", str(path)))
    for name, lines in services.items():
        lines.wait(lambda s: bool(s.of("ready")), 30, f"{name} ready")
    service_pids = {name: lines.proc.pid for name, lines in services.items()}

    checkout = Lines(processes.python(SERVICES, "checkout", "--orders", "0", "--every", "0.02", "--topology", str(path)))
    analytics, mailer, fulfilment = services["analytics"], services["mailer"], services["fulfilment"]

    # Every pattern carries the first 30 orders, each exactly once where the pattern promises it.
    first = list(range(1, 31))
    analytics.wait(lambda s: len(s.of("sale")) >= 30, 60, "30 sales at analytics")
    mailer.wait(lambda s: len(s.of("sale")) >= 30 and len(s.of("receipt")) >= 30, 60, "30 sales and receipts at mailer")
    fulfilment.wait(lambda s: set(first) <= set(s.numbers("fulfilled")), 60, "orders 1-30 fulfilled")
    # checkout reports an order after sending it, so the others may have seen it before its line is read
    checkout.wait(lambda s: set(first) <= set(s.numbers("order")), 30, "orders 1-30 reported by checkout")
    orders = {e["n"]: e for e in checkout.of("order")}
    assert all(orders[n]["quorum_met"] and len(orders[n]["quotes"]) >= 2 and orders[n]["price"] > 0 for n in first)
    assert analytics.numbers("sale")[:30] == first
    assert mailer.numbers("sale")[:30] == first
    assert mailer.numbers("receipt")[:30] == first

    # kill -9 the forwarder: `up` restarts it; publishing resumes without restarting any service.
    old = component(status(path), "forwarder")
    os.kill(old["pid"], signal.SIGKILL)
    assert wait_until(lambda: (lambda c: c["restarts"] == 1 and c["state"] == "running")(
        component(status(path), "forwarder")), timeout=30), status(path)
    new = component(status(path), "forwarder")
    assert new["pid"] != old["pid"]
    published_by_now = max(checkout.numbers("order"))
    analytics.wait(lambda s: max(s.numbers("sale")) > published_by_now + 20, 60, "sales after the restart at analytics")
    mailer.wait(lambda s: max(s.numbers("sale")) > published_by_now + 20, 60, "sales after the restart at mailer")
    assert {name: lines.proc.pid for name, lines in services.items()} == service_pids
    assert all(lines.proc.poll() is None for lines in services.values())
    assert component(status(path), "sidecar")["restarts"] == 0
    assert component(status(path), "forwarder")["messages_out"] > 0  # counters of the new run reach status

    checkout.proc.send_signal(signal.SIGTERM)
    checkout.proc.wait(20)
    checkout.wait(lambda s: bool(s.of("summary")), 10, "checkout summary")
    summary = checkout.of("summary")[0]
    assert summary["failed"] == 0 and summary["orders"] == summary["quorum_met"] > 30
    # The reliable queue lost nothing while the forwarder was down: every confirmed order is fulfilled.
    fulfilment.wait(lambda s: set(range(1, summary["orders"] + 1)) <= set(s.numbers("fulfilled")), 30, "every order fulfilled")

    # SIGTERM to `up` stops its components in order, within a few seconds.
    pids = [c["pid"] for c in status(path)["components"]]
    started = time.monotonic()
    up.send_signal(signal.SIGTERM)
    assert up.wait(15) == 0
    assert time.monotonic() - started < 8
    assert not any(alive(pid) for pid in pids)
    out = up.stdout.read() if up.stdout else ""
    assert "zfabric up forwarder events restarting restarts=0 exit=-9" in out
    assert "zfabric up stopped topology=shop" in out


def small_topology(tmp_path: Path, ipc_dir: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(f"""\
name: small
defaults: {{transport: ipc, ipc_dir: "{ipc_dir}"}}
forwarders: {{events: {{}}}}
sidecars: {{main: {{store: state/main.db}}}}
queues: {{jobs: {{sidecar: main}}}}
""")
    return path


@pytest.mark.timeout(90)
def test_up_restarts_a_killed_sidecar_refuses_a_second_up_and_leaves_no_orphans(processes: Processes, tmp_path: Path,
                                                                                 ipc_dir: Path) -> None:
    path = small_topology(tmp_path, ipc_dir)
    missing = subprocess.run([sys.executable, "-m", "zfabric", "status", str(path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1
    assert "no `zfabric up` answered for topology 'small'" in missing.stderr

    up = start_up(processes, path)
    second = subprocess.run([sys.executable, "-m", "zfabric", "up", str(path), "--no-live"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert "is already running (pid" in second.stderr

    table = subprocess.run([sys.executable, "-m", "zfabric", "status", str(path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert re.search(r"forwarder events\s+│\s+running\s+│\s+\d+\s+│ xsub=ipc://", table.stdout), table.stdout
    assert re.search(r"sidecar main\s+│\s+running", table.stdout), table.stdout

    # Foreign bytes and oversize frames on the status address are ignored; `up` keeps answering.
    ctx = zmq.Context()
    try:
        rogue = ctx.socket(zmq.DEALER)
        rogue.linger = 0
        rogue.connect(f"ipc://{ipc_dir}/control")
        rogue.send_multipart([b"garbage", b"more"])
        rogue.send(b"x" * 100_000)
        assert status(path)["topology"] == "small"
        rogue.close(0)
    finally:
        ctx.term()

    sidecar = component(status(path), "sidecar")
    os.kill(sidecar["pid"], signal.SIGKILL)
    assert wait_until(lambda: (lambda c: c["restarts"] == 1 and c["state"] == "running")(
        component(status(path), "sidecar")), timeout=30), status(path)
    with Fabric.from_topology(path) as fabric:
        fabric.producer("jobs").send_many(range(5), timeout=10)  # confirmed by the restarted sidecar
    assert wait_until(lambda: component(status(path), "sidecar")["counters"].get("confirmed") == 5, timeout=10)

    pids = [c["pid"] for c in status(path)["components"]]
    up.kill()  # the supervisor dies without a chance to clean up ...
    up.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)  # ... and its children follow it


@pytest.mark.timeout(90)
def test_demo_runs_on_the_shop_topology(tmp_path: Path, ipc_dir: Path) -> None:
    path = shop_copy(tmp_path, ipc_dir)
    done = subprocess.run([sys.executable, "-m", "zfabric", "demo", "--topology", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=80, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("reliable queue orders │ 100 confirmed durable, 100/100 handled and acked",
                 "queue receipts        │ 100/100 delivered, in order",
                 "topic sales           │ 100/100 received through the forwarder, gaps 0",
                 "service pricing       │ 50/50 correlated replies",
                 "group quotes          │ 10 rounds to 3 members, quorum 2 met in 10", "5/5 parts ok"):
        assert line in done.stdout, done.stdout
