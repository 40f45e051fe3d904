"""`zfabric demo --topology FILE`: start a topology's infrastructure and push traffic through every part it declares.

For each queue, topic, service and group the demo plays both ends itself (through
`Fabric`, exactly as services would) and checks what arrived: every message once, in
order where the pattern promises order. It is for a laptop or a staging host: it binds
the addresses the file declares, so stop the real services first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..envelope import Envelope
from ..errors import FabricError
from ..patterns.queue import Producer
from .fabric import Fabric
from .supervisor import Supervisor


@dataclass
class Outcome:
    """What one part of the topology did in the demo."""

    part: str
    detail: str
    ok: bool
    seconds: float


def _timed(part: str, run: Callable[[], tuple[str, bool]]) -> Outcome:
    start = time.perf_counter()
    try:
        detail, ok = run()
    except FabricError as exc:
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return Outcome(part, detail, ok, time.perf_counter() - start)


def _plain_queue(fabric: Fabric, name: str, n: int) -> tuple[str, bool]:
    consumer = fabric.consumer(name)
    producer = fabric.producer(name, send_timeout=5.0)
    assert isinstance(producer, Producer)
    producer.wait_for_consumers(1, timeout=10)
    for i in range(n):
        producer.send({"n": i})
    got = [consumer.receive(timeout=5).body["n"] for _ in range(n)]
    return f"{len(got)}/{n} delivered, in order", got == list(range(n))


def _reliable_queue(fabric: Fabric, name: str, n: int) -> tuple[str, bool]:
    seen: list[int] = []
    done = threading.Event()

    def handle(env: Envelope) -> None:
        seen.append(env.body["n"])
        if len(seen) >= n:
            done.set()

    worker = fabric.worker(name, handle).start()
    fabric.producer(name).send_many([{"n": i} for i in range(n)], timeout=10)
    done.wait(15)
    worker.stop()
    return f"{n} confirmed durable, {len(set(seen))}/{n} handled and acked", sorted(set(seen)) == list(range(n))


def _topic(fabric: Fabric, name: str, n: int) -> tuple[str, bool]:
    sub = fabric.subscriber(name)
    sub.wait_ready(10)
    pub = fabric.publisher(name)
    pub.wait_for_subscribers(1, topic=name, timeout=10)
    for i in range(n):
        pub.publish(name, {"n": i})
    got = [sub.receive(timeout=5).body["n"] for _ in range(n)]
    return f"{len(got)}/{n} received through the forwarder, gaps {sub.gaps}", got == list(range(n))


def _service(fabric: Fabric, name: str, n: int) -> tuple[str, bool]:
    fabric.replier(name, lambda env: {"echo": env.body}).start()
    requester = fabric.requester(name)
    answers = [requester.request(i) for i in range(n)]
    ok = answers == [{"echo": i} for i in range(n)]
    return f"{sum(a['echo'] == i for i, a in enumerate(answers))}/{n} correlated replies", ok


def _group(fabric: Fabric, name: str, rounds: int) -> tuple[str, bool]:
    spec = fabric.topology.groups[name]
    for member in spec.members:
        fabric.member(name, member, lambda env, member=member: member).start()
    scatterer = fabric.scatterer(name)
    results = [scatterer.scatter(i) for i in range(rounds)]
    met = sum(r.quorum_met for r in results)
    need = spec.quorum or len(spec.members)
    return f"{rounds} rounds to {len(spec.members)} members, quorum {need} met in {met}", met == rounds


def exercise(fabric: Fabric, messages: int = 100) -> list[Outcome]:
    """Traffic through every queue, topic, service and group of the fabric's topology (its infrastructure must run)."""
    t = fabric.topology
    out: list[Outcome] = []
    for name, q in t.queues.items():
        kind = "reliable queue" if q.reliable else "queue"
        out.append(_timed(f"{kind} {name}", partial(_reliable_queue if q.reliable else _plain_queue, fabric, name, messages)))
    for name in t.topics:
        out.append(_timed(f"topic {name}", partial(_topic, fabric, name, messages)))
    for name in t.services:
        out.append(_timed(f"service {name}", partial(_service, fabric, name, min(messages, 50))))
    for name in t.groups:
        out.append(_timed(f"group {name}", partial(_group, fabric, name, 10)))
    return out


def run_topology_demo(path: str | Path, console: Console | None = None, messages: int = 100) -> bool:
    """Start the file's forwarders and sidecars (as `zfabric up` does), exercise every part, stop; True if all passed."""
    console = console or Console()
    sup = Supervisor(path)
    console.rule(f"[bold]zfabric demo on topology {sup.topology.name!r} ({path})")
    errors: list[BaseException] = []
    ready = threading.Event()

    def supervise() -> None:
        try:
            sup.run(on_ready=lambda s: ready.set())
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=supervise, name="zfabric-demo-up", daemon=True)
    thread.start()
    ready.wait(60)
    try:
        if errors:
            raise errors[0]
        for st in sup.statuses():
            console.print(f"started {st.kind} {st.name} (pid {st.pid}) at {st.address}")
        with Fabric(sup.topology) as fabric:
            outcomes = exercise(fabric, messages)
    finally:
        sup.stop()
        thread.join(15)
    table = Table(title=f"every part of {sup.topology.name}")
    for column in ("part", "result", "time", ""):
        table.add_column(column)
    for o in outcomes:
        table.add_row(o.part, o.detail, f"{o.seconds * 1000:.0f} ms", "[green]ok[/]" if o.ok else "[red]FAILED[/]")
    console.print(table)
    good = all(o.ok for o in outcomes)
    console.rule(f"[bold {'green' if good else 'red'}]{sum(o.ok for o in outcomes)}/{len(outcomes)} parts ok")
    return good
