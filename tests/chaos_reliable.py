"""A reliable queue under random faults, checked at the end: `python -m tests.chaos_reliable [--seed N]`.

Not part of the suite (it runs about a minute, and its faults are random): run it after
changing the sidecar, its store or the workers. A producer sends `--messages` messages while
three workers handle them (every 97th fails while a flag file exists, so it is dead-lettered
after 3 attempts) and, for `--seconds`, a random fault every 0.2-0.6 s: a worker killed with
SIGKILL and restarted, a worker frozen (SIGSTOP) for up to 3 s, a replay of the dead-letter
queue, or the sidecar killed with SIGKILL and restarted on the same address. Then the flag is
removed, dead letters are replayed until none is left, and it checks: every confirmed message
was handled and is acknowledged in the store, no attempt number was handed out twice for one
message, and SQLite finds the file sound. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from zfabric import ReliableProducer
from zfabric.errors import FabricError
from zfabric.sidecar.client import SidecarClient
from zfabric.sidecar.service import SidecarProcess
from zfabric.sidecar.store import DeadLetterFilter, Store

from .conftest import free_tcp_ports
from .reliable_actors import read_logs

ROOT = Path(__file__).resolve().parent.parent


def run(seed: int, messages: int, seconds: float) -> bool:
    rnd = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="zf-chaos-"))
    store = tmp / "q.db"
    endpoint = f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"
    flag = tmp / "fail"
    flag.touch()
    poison = sum((["--poison", str(n)] for n in range(0, messages, 97)), [])
    logs = [tmp / f"w{i}.log" for i in range(3)]

    def sidecar() -> SidecarProcess:
        return SidecarProcess(str(store), ["orders"], endpoint=endpoint, extra_args=[
            "--max-attempts", "3", "--backoff-base", "0.05", "--backoff-cap", "0.2", "--lease-timeout", "2"]).start()

    def worker(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tests.reliable_actors", "worker", endpoint, str(logs[i]),
                                 "--window", str(rnd.choice([10, 50, 100])), "--fail-flag", str(flag), *poison],
                                cwd=ROOT, stdout=subprocess.DEVNULL)

    sc = sidecar()
    workers = {i: worker(i) for i in range(3)}
    confirmed: list[str] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with ReliableProducer(endpoint, "orders", timeout=120, resend_after=0.5) as producer:
                for start in range(0, messages, 1000):
                    producer.send_many(({"n": n} for n in range(start, min(messages, start + 1000))),
                                       on_confirm=lambda env: confirmed.append(env.id_hex))
        except BaseException as exc:  # reported below
            errors.append(exc)

    feeder = threading.Thread(target=produce)
    feeder.start()
    faults: Counter[str] = Counter()
    try:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            time.sleep(rnd.uniform(0.2, 0.6))
            fault = rnd.choice(["kill worker", "freeze worker", "replay", "kill sidecar", "none"])
            faults[fault] += 1
            i = rnd.randrange(3)
            if fault == "kill worker":
                workers[i].kill()
                workers[i].wait()
                workers[i] = worker(i)
            elif fault == "freeze worker":
                workers[i].send_signal(signal.SIGSTOP)
                time.sleep(rnd.uniform(0.1, 3.0))
                workers[i].send_signal(signal.SIGCONT)
            elif fault == "replay":
                try:
                    with SidecarClient(endpoint, timeout=3) as control:
                        control.replay(DeadLetterFilter())
                except FabricError as exc:
                    print(f"replay failed (the sidecar may be restarting): {exc}")
            elif fault == "kill sidecar":
                sc.kill()
                sc = sidecar()
        feeder.join(180)
        flag.unlink()
        stored: dict[str, int] = {}
        until = time.monotonic() + 90
        while time.monotonic() < until:
            with SidecarClient(endpoint, timeout=5) as control:
                control.replay(DeadLetterFilter())
                stored = control.stats()["stored"]
            if stored["done"] == len(confirmed) and not any(stored[k] for k in ("ready", "in-flight", "delayed", "dead")):
                break
            time.sleep(0.5)
    finally:
        for w in workers.values():
            w.kill()
            w.wait()
        sc.stop()
    rows = read_logs(logs)
    handled = {r[0] for r in rows}
    attempts = Counter((r[0], r[1]) for r in rows)
    on_file = Store(store)
    try:
        not_done = [i for i in confirmed if (r := on_file.record(bytes.fromhex(i))) is None or r.state != "done"]
        sound = on_file.integrity_check()
    finally:
        on_file.close()
    problems = {
        "producer errors": len(errors),
        "confirmed, never handled": len(set(confirmed) - handled),
        "confirmed, not acknowledged in the store": len(not_done),
        "an attempt number handed out twice": sum(1 for n in attempts.values() if n > 1),
        "integrity check not ok": int(sound != "ok"),
    }
    print(f"seed {seed}: faults {dict(faults)}; confirmed {len(confirmed):,} of {messages:,}; handled {len(rows):,} "
          f"times in all (failures and repeats after faults included); store at the end {stored}")
    for what, n in problems.items():
        print(f"  {what}: {n}")
    return not any(problems.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=12.0, help="how long faults are made")
    args = parser.parse_args()
    raise SystemExit(0 if run(args.seed, args.messages, args.seconds) else 1)


if __name__ == "__main__":
    main()
