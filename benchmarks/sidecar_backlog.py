"""A large backlog through one sidecar: store it with no workers, kill -9 the sidecar, restart, drain it.

Prints how fast the backlog was stored, the store's size on disk, how long the restart took
and the sidecar's memory after it, how fast two workers drained it, and how many deliveries
were repeats (a kill with no worker connected should cause none).

    python benchmarks/sidecar_backlog.py                 # 1,000,000 messages of 100 B
    python benchmarks/sidecar_backlog.py --messages 200000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from zfabric import ReliableProducer
from zfabric.sidecar.client import SidecarClient
from zfabric.sidecar.service import SidecarProcess


def kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run(messages: int, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="zf-backlog-") as tmp:
        store = os.path.join(tmp, "backlog.db")
        sidecar = SidecarProcess(store, ["bench"]).start()
        body = b"x" * size
        t0 = time.perf_counter()
        with ReliableProducer(sidecar.endpoint, "bench", timeout=60) as producer:
            for i in range(0, messages, 10_000):
                producer.send_many([body] * min(10_000, messages - i))
        took = time.perf_counter() - t0
        on_disk = sum(os.path.getsize(store + ext) for ext in ("", "-wal") if os.path.exists(store + ext))
        print(f"stored {messages:,} in {took:.1f} s ({messages / took:,.0f} msg/s), {on_disk / 1e6:.0f} MB on disk")
        sidecar.kill()
        t1 = time.perf_counter()
        sidecar = SidecarProcess(store, ["bench"]).start()
        print(f"after kill -9: restarted and ready in {time.perf_counter() - t1:.2f} s, "
              f"sidecar resident {kib(sidecar.pid, 'VmRSS') / 1024:.0f} MiB")
        workers = [subprocess.Popen([sys.executable, "-m", "zfabric.bench.actors", "rel-worker",
                                     f'{{"endpoint": "{sidecar.endpoint}"}}'], stdout=subprocess.DEVNULL)
                   for _ in range(2)]
        try:
            with SidecarClient(sidecar.endpoint) as control:
                t2 = time.perf_counter()
                while (stats := control.stats())["counters"]["acked"] < messages:
                    time.sleep(0.2)
                took = time.perf_counter() - t2
            print(f"drained by 2 workers in {took:.1f} s ({messages / took:,.0f} msg/s); "
                  f"repeated deliveries {stats['counters']['delivered'] - messages}; "
                  f"sidecar peak resident {kib(sidecar.pid, 'VmHWM') / 1024:.0f} MiB")
        finally:
            for w in workers:
                w.kill()
                w.wait()
            sidecar.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=100, help="body bytes")
    args = parser.parse_args()
    run(args.messages, args.size)


if __name__ == "__main__":
    main()
