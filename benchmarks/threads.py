"""CPU time per message of every thread of a queue run's two processes, zfabric against raw pyzmq:
where a machine's cores go when a row is CPU-bound.

Each run is the benchmark's own queue actors (`zfabric/bench/actors.py`): a consumer process and a
producer process, both at full speed. The threads of both are sampled from /proc every 20 ms; what
one more message costs each thread is the difference between a short and a long run, divided by the
difference of their message counts, so start-up and imports cancel out. Also per 1,000 messages:
the thread's voluntary context switches (it went to sleep: nothing to do, or a full queue) and its
involuntary ones (the scheduler took the core away: more runnable threads than cores).

    python benchmarks/threads.py --size 4096                 # about a minute
    python benchmarks/threads.py --size 100 --impls raw,zf --short 50000 --long 550000

When every core is busy, a row's rate is about `cores / (CPU a message, all threads together)`, so
a microsecond any thread adds is rate lost, whichever process it is in. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

from zfabric.bench.suite import procs

TICK = os.sysconf("SC_CLK_TCK")
IMPLS = ("raw", "raw-msgpack", "zf")


def _threads(pid: int) -> dict[int, tuple[str, float, int, int]]:
    """{tid: (name, CPU seconds, voluntary switches, involuntary switches)} of a live process's threads."""
    found = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:  # the thread, or the process, just ended
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        switches = dict(line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line)
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        found[int(task.name)] = (name, cpu, int(switches["voluntary_ctxt_switches"]),
                                 int(switches["nonvoluntary_ctxt_switches"]))
    return found


def _label(side: str, name: str, tid: int, pid: int) -> str:
    if tid == pid:
        return f"{side} main"
    if name.startswith("ZMQbg/IO"):
        return f"{side} I/O"
    if name.startswith("ZMQbg"):
        return f"{side} {name[6:]}"
    return f"{side} thread"  # a Python thread: zfabric's flusher, pyzmq's zero-copy garbage collector


def run(impl: str, count: int, size: int) -> tuple[float, dict[str, list[float]]]:
    """(msg/s, {thread: [CPU s, voluntary, involuntary]}) of one queue run, summed per kind of thread."""
    last: dict[str, dict[int, tuple[str, float, int, int]]] = {"consumer": {}, "producer": {}}
    with procs() as ps:
        pull = ps.spawn("queue-pull", impl=impl, count=count, size=size)
        push = ps.spawn("queue-push", impl=impl, endpoint=ps.read(pull, "endpoint"), count=count, size=size)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for side, proc in (("consumer", pull), ("producer", push)):
                    last[side].update(_threads(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = ps.read(pull, "result", timeout=600)
        done.set()
        sampler.join()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for side, proc in (("consumer", pull), ("producer", push)):
        for tid, (name, cpu, vol, invol) in last[side].items():
            entry = totals[_label(side, name, tid, proc.pid)]
            entry[0] += cpu
            entry[1] += vol
            entry[2] += invol
    return result["count"] / result["seconds"], dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="body size in bytes (default 4096)")
    parser.add_argument("--impls", default="raw,zf", help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--short", type=int, default=50_000, help="messages of the short run")
    parser.add_argument("--long", type=int, default=450_000, help="messages of the long run")
    parser.add_argument("--runs", type=int, default=3, help="pairs of runs per implementation (medians)")
    args = parser.parse_args()
    impls = args.impls.split(",")
    cores = os.cpu_count() or 1
    per: dict[str, dict[str, list[list[float]]]] = {impl: defaultdict(list) for impl in impls}
    rates: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.runs):
        for impl in impls:  # taking turns, as the bench does: a slow spell falls on every implementation
            _, short = run(impl, args.short, args.size)
            rate, long = run(impl, args.long, args.size)
            rates[impl].append(rate)
            for label in long:
                before = short.get(label, [0.0, 0, 0])
                per[impl][label].append([(b - a) / (args.long - args.short) for a, b in zip(before, long[label])])
    print(f"{args.size} B bodies, {cores} cores, medians of {args.runs} (long - short) runs; "
          "CPU us a message, context switches per 1,000 messages (voluntary / involuntary)")
    for impl in impls:
        rate = statistics.median(rates[impl])
        print(f"\n{impl}: {rate:,.0f} msg/s")
        total = 0.0
        for label in sorted(per[impl]):
            cpu, vol, invol = (statistics.median(v[i] for v in per[impl][label]) for i in range(3))
            total += cpu
            if cpu * 1e6 >= 0.005 or vol * 1000 >= 0.05:
                print(f"  {label:18s} {cpu * 1e6:7.2f} us   {vol * 1000:7.1f} / {invol * 1000:6.1f}")
        print(f"  {'all threads':18s} {total * 1e6:7.2f} us   busy {rate * total / cores:.0%} of {cores} cores")


if __name__ == "__main__":
    main()
