"""The benchmark suite: every figure measured through raw pyzmq and through zfabric in the same run.

Each measurement runs its producer and consumer (or client and server) as separate
processes (`zfabric.bench.actors`), repeats it, raw and zfabric taking turns, and keeps the
median. Ratios compare the two implementations of the same run, so they mean something on
any machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar

import zmq

from ..errors import FabricError

T = TypeVar("T")

IMPLS = ("raw", "zf")


@dataclass
class Row:
    """One figure: the raw and zfabric values of the same run, their ratio, and the target it is held to."""

    figure: str
    unit: str
    raw: float | None
    zf: float | None
    higher_is_better: bool = True
    target: float | None = None
    """Required zf/raw ratio: at least this (higher is better) or at most this (lower is better)."""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.raw is None or self.zf is None or not self.raw:
            return None
        return self.zf / self.raw

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


@dataclass(frozen=True)
class Plan:
    """How much traffic each measurement moves; `quick` is a smoke run (about 15 s)."""

    quick: bool
    repeat: int
    queue_counts: dict[int, int]
    rr_latency: int
    rr_throughput: int
    scatter_rounds: int
    pubsub_count: int
    reliable_count: int
    memory_count: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1, {100: 20_000, 4096: 5_000, 262_144: 200}, 300, 2_000, 50, 10_000, 5_000, 50_000)
        return cls(False, 3, {100: 300_000, 4096: 100_000, 262_144: 3_000}, 5_000, 50_000, 1_000, 200_000, 100_000,
                   1_000_000)


class Procs:
    """The child processes of one measurement; all are killed when it ends, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, role: str, **args: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "zfabric.bench.actors", role, json.dumps(args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def spawn_cli(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "zfabric", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def read(proc: subprocess.Popen[str], key: str, timeout: float = 120.0) -> Any:
        """The value of `key` in the next JSON line that has it; FabricError with the child's stderr otherwise."""
        found: list[Any] = []

        def reader() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict) and key in msg:
                    found.append(msg[key])
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            code = proc.poll()
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            if code is not None:
                err = f"(it exited with code {code})\n{err}"
            role = " ".join(map(str, proc.args[3:])) if isinstance(proc.args, list) else proc.args  # with its arguments
            raise FabricError(f"benchmark process {role!s} gave no {key!r} "
                              f"({'it ended' if code is not None else f'within {timeout:g} s'}): {err[-2000:]}")
        return found[0]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)


@contextmanager
def procs() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.close()


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- measurements ------------------------------------------------------------------------

def queue_rate(impl: str, count: int, size: int, batch: int = 0, curve: bool = False) -> tuple[float, float]:
    """(messages per second, consumer peak RSS MiB) for one PUSH -> PULL run (zf: `send_batch` of `batch` if set;
    `curve`: both ends encrypt, with keys made for the run)."""
    with procs() as ps, tempfile.TemporaryDirectory(prefix="zf-bench-keys-") as keys:
        extra = {"keys": keys} if curve else {}
        pull = ps.spawn("queue-pull", impl=impl, count=count, size=size, **extra)
        ps.spawn("queue-push", impl=impl, endpoint=ps.read(pull, "endpoint"), count=count, size=size, batch=batch,
                 **extra)
        result = ps.read(pull, "result")
    return result["count"] / result["seconds"], result["rss_mb"]


def _queue_msgs(impl: str, count: int, size: int, batch: int = 0, curve: bool = False) -> float:
    return queue_rate(impl, count, size, batch, curve)[0]


def rr(impl: str, count: int, inflight: int, batch: int | None = None) -> dict[str, Any]:
    with procs() as ps:
        server = ps.spawn("echo-server", impl=impl)
        client = ps.spawn("rr-client", impl=impl, endpoint=ps.read(server, "endpoint"), count=count,
                          inflight=inflight, size=100, batch=batch)
        return dict(ps.read(client, "result"))


def rr_rate(impl: str, count: int, inflight: int, batch: int | None = None) -> float:
    result = rr(impl, count, inflight, batch)
    return float(result["count"] / result["seconds"])


def scatter(impl: str, members: int, rounds: int) -> list[float]:
    with procs() as ps:
        servers = [ps.spawn("echo-server", impl=impl) for _ in range(members)]
        endpoints = [ps.read(s, "endpoint") for s in servers]
        client = ps.spawn("sg-client", impl=impl, endpoints=endpoints, count=rounds, size=100)
        return list(ps.read(client, "result")["rtts"])


def pubsub_rate(impl: str, subscribers: int, count: int) -> float:
    """Messages per second of the slowest subscriber, through a `zfabric forwarder` process."""
    from ..patterns.forwarder import ForwarderProcess

    with procs() as ps, ForwarderProcess(extra_args=["--hwm", "0"]) as fwd:
        pub = ps.spawn("ps-pub", impl=impl, xsub=fwd.xsub_endpoint, count=count, size=100, subscribers=subscribers)
        subs = [ps.spawn("ps-sub", impl=impl, xpub=fwd.xpub_endpoint, count=count) for _ in range(subscribers)]
        for s in subs:
            ps.read(s, "ready", timeout=30)
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        results = [ps.read(s, "result") for s in subs]
    if any(r["count"] < count - 1 for r in results):
        raise FabricError(f"a subscriber lost messages in the benchmark: {[r['count'] for r in results]} of {count - 1}")
    return min(r["count"] / r["seconds"] for r in results)


def reliable_rate(count: int, synchronous: str) -> tuple[float, float]:
    """(confirmed durable, processed) messages per second: 1 producer, a sidecar process, 2 workers.
    Processed: until the workers have acknowledged every message."""
    from ..sidecar.service import SidecarProcess

    with tempfile.TemporaryDirectory(prefix="zf-bench-") as tmp, procs() as ps:
        sidecar = SidecarProcess(f"{tmp}/bench.db", ["bench"], extra_args=["--synchronous", synchronous]).start()
        try:
            workers = [ps.spawn("rel-worker", endpoint=sidecar.endpoint) for _ in range(2)]
            for w in workers:
                ps.read(w, "ready")
            producer = ps.spawn("rel-producer", endpoint=sidecar.endpoint, count=count, size=100)
            result = ps.read(producer, "result", timeout=300)
        finally:
            sidecar.stop()
            sidecar.kill()
    return result["count"] / result["seconds"], result["count"] / result["processed_seconds"]


def memory(impl: str, count: int) -> dict[str, float | None]:
    """Peak RSS MiB of producer and consumer moving `count` messages to a consumer that pauses 1 ms every 1,000,
    and each one's RSS when the messages started (`*_start_mb`; None where the peak cannot be reset)."""
    with procs() as ps:
        pull = ps.spawn("queue-pull", impl=impl, count=count, size=100, slow_every=1000)
        push = ps.spawn("queue-push", impl=impl, endpoint=ps.read(pull, "endpoint"), count=count, size=100)
        consumer = ps.read(pull, "result", timeout=600)
        producer = ps.read(push, "result", timeout=60)
    return {"producer_mb": producer["rss_mb"], "consumer_mb": consumer["rss_mb"],
            "producer_start_mb": producer.get("rss_start_mb"), "consumer_start_mb": consumer.get("rss_start_mb")}


def _memory_note(m: dict[str, float | None]) -> str:
    """"producer 36 MiB (35 at start), consumer ..." for the memory rows."""
    def one(side: str) -> str:
        start = m[f"{side}_start_mb"]
        return f"{side} {m[f'{side}_mb']:.0f} MiB" + ("" if start is None else f" ({start:.0f} at start)")
    return f"{one('producer')}, {one('consumer')}"


# -- the suite ----------------------------------------------------------------------------

def run_suite(quick: bool = False, on_row: Callable[[Row], None] | None = None,
              only: set[str] | None = None) -> list[Row]:
    """Measure every figure; `on_row` sees each row as soon as it is done (for a live table)."""
    plan = Plan.make(quick)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def want(group: str) -> bool:
        return only is None or group in only

    def turns(measures: Mapping[str, Callable[[], T]]) -> dict[str, list[T]]:
        """`repeat` runs of each measure, taking turns (raw, zfabric, raw, zfabric, ...): a slow spell of the
        machine then falls on both sides of a ratio, not on one side's three runs in a row."""
        runs: dict[str, list[T]] = {name: [] for name in measures}
        for _ in range(plan.repeat):
            for name, measure in measures.items():
                runs[name].append(measure())
        return runs

    def medians(runs: dict[str, list[float]]) -> dict[str, float]:
        return {name: _median(values) for name, values in runs.items()}

    raw_queue_100 = None
    if want("queue"):
        for size, count in plan.queue_counts.items():
            measures = {impl: partial(_queue_msgs, impl, count, size) for impl in IMPLS}
            if size == 100:
                measures["batch"] = partial(_queue_msgs, "zf", count, size, 100)
                measures["async"] = partial(_queue_msgs, "zf-async", count, size)
            elif size == 4096:
                measures["raw-msgpack"] = partial(_queue_msgs, "raw-msgpack", count, size)
            rates = medians(turns(measures))
            label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
            target = 0.7 if size == 100 else 0.8
            add(Row(f"queue msgs/s, {label}, tcp", "msg/s", rates["raw"], rates["zf"], target=target,
                    extra={"MB/s raw": rates["raw"] * size / 1e6, "MB/s zf": rates["zf"] * size / 1e6}))
            if "raw-msgpack" in rates:  # issue 5's own raw ("just msgpack"); the row above passes the bytes as they are
                add(Row(f"queue msgs/s, {label}, tcp, vs raw msgpack-encoding the body", "msg/s", rates["raw-msgpack"],
                        rates["zf"], note="raw as issue 5 words it; the row above is stricter",
                        extra={"MB/s raw": rates["raw-msgpack"] * size / 1e6, "MB/s zf": rates["zf"] * size / 1e6}))
            if size == 100:
                raw_queue_100 = rates["raw"]
                add(Row(f"queue msgs/s, {label}, tcp, send_batch of 100 (vs raw per message)", "msg/s", rates["raw"],
                        rates["batch"], target=0.7))
                add(Row(f"queue msgs/s, {label}, tcp, asyncio faces (vs raw, sync)", "msg/s", rates["raw"],
                        rates["async"]))
    if want("curve"):
        for size in (100, 4096):
            count = plan.queue_counts[size] // 2
            label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
            secure = medians(turns({impl: partial(_queue_msgs, impl, count, size, curve=True) for impl in IMPLS}))
            add(Row(f"queue msgs/s, {label}, tcp + CURVE (both encrypt)", "msg/s", secure["raw"], secure["zf"],
                    extra={"MB/s raw": secure["raw"] * size / 1e6, "MB/s zf": secure["zf"] * size / 1e6}))
    if want("reqrep"):
        lat = turns({impl: partial(rr, impl, plan.rr_latency, 1) for impl in IMPLS})
        p50 = {impl: _median([_pct(r["rtts"], 0.5) for r in lat[impl]]) * 1e6 for impl in IMPLS}
        p99 = {impl: _median([_pct(r["rtts"], 0.99) for r in lat[impl]]) * 1e6 for impl in IMPLS}
        add(Row("request-reply p50, 1 in flight", "us", p50["raw"], p50["zf"], higher_is_better=False, target=1.3))
        add(Row("request-reply p99, 1 in flight", "us", p99["raw"], p99["zf"], higher_is_better=False))
        tput = medians(turns({**{impl: partial(rr_rate, impl, plan.rr_throughput, 100) for impl in IMPLS},
                              "single": partial(rr_rate, "zf", plan.rr_throughput, 100, 1)}))
        add(Row("request-reply req/s, 100 in flight (request_many: one batch of 100; vs raw per message)", "req/s",
                tput["raw"], tput["zf"], target=0.7))
        add(Row("request-reply req/s, 100 in flight, one request per message (batch=1)", "req/s", tput["raw"],
                tput["single"], target=0.7))
    if want("scatter"):
        for members in (3, 10):
            runs = turns({impl: partial(scatter, impl, members, plan.scatter_rounds) for impl in IMPLS})
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                vals = {impl: _median([_pct(r, q) for r in runs[impl]]) * 1e6 for impl in IMPLS}
                add(Row(f"scatter-gather {name}, {members} members", "us", vals["raw"], vals["zf"], higher_is_better=False))
    if want("pubsub"):
        for subs in (1, 3):
            rates = medians(turns({impl: partial(pubsub_rate, impl, subs, plan.pubsub_count) for impl in IMPLS}))
            add(Row(f"pub/sub msgs/s per subscriber, 100 B, {subs} sub(s), via forwarder", "msg/s", rates["raw"],
                    rates["zf"], target=0.7 if subs == 1 else None))
    if want("reliable"):
        if raw_queue_100 is None:
            raw_queue_100 = _median(turns({"raw": partial(_queue_msgs, "raw", plan.queue_counts[100], 100)})["raw"])
        for sync in ("full", "normal"):
            rate, processed = reliable_rate(plan.reliable_count, sync)
            add(Row(f"reliable confirmed msgs/s, 100 B, synchronous={sync} (vs raw queue)", "msg/s", raw_queue_100, rate,
                    target=0.1 if sync == "full" else None, note="1 producer, sidecar, 2 workers"))
            if sync == "full":
                add(Row("reliable processed msgs/s (until the workers acked all), 100 B, synchronous=full (vs raw queue)",
                        "msg/s", raw_queue_100, processed, note="the same run"))
    if want("memory"):
        for impl in IMPLS:
            measured = memory(impl, plan.memory_count)
            add(Row(f"peak RSS moving {plan.memory_count:,} msgs to a slow consumer, {impl}", "MiB", None, None,
                    note=_memory_note(measured), extra=measured))
    return rows


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import msgpack

    from .. import __version__

    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)), "zfabric": __version__,
            "platform": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
