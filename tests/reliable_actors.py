"""Worker and producer processes for the reliable-delivery tests: `python -m tests.reliable_actors ...`.

Each worker appends one line per handled message to its own file, written before the
handler returns (so before the ack): `id-hex attempt pid`. A test reads every file to
count what was processed, lost and duplicated, whatever was killed on the way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from zfabric.envelope import Envelope
from zfabric.errors import Unconfirmed
from zfabric.patterns.reliable import AsyncReliableProducer, ReliableProducer
from zfabric.patterns.worker import AsyncWorker, Worker


def make_handler(log_path: str, delay: float, poison: set[int], fail_flag: str | None):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pid = os.getpid()

    def handle(env: Envelope) -> None:
        n = env.body["n"] if isinstance(env.body, dict) else -1
        os.write(fd, f"{env.id.hex()} {env.attempt} {pid} {n}\n".encode())
        if delay:
            time.sleep(delay)
        if n in poison and (fail_flag is None or os.path.exists(fail_flag)):
            raise ValueError(f"poison message {n}")

    return handle


def worker(args: argparse.Namespace) -> None:
    handler = make_handler(args.log, args.delay, set(args.poison), args.fail_flag)
    print(f"worker ready pid={os.getpid()}", flush=True)
    if args.asyncio:
        async def main() -> None:
            w = AsyncWorker(args.endpoint, args.queue, handler, window=args.window, heartbeat=args.heartbeat)
            try:
                await w.run()
            finally:
                w.close(0)
        asyncio.run(main())
    else:
        w = Worker(args.endpoint, args.queue, handler, window=args.window, heartbeat=args.heartbeat)
        try:
            w.run()
        finally:
            w.close(0)


def producer(args: argparse.Namespace) -> None:
    """Sends `count` messages in one batch call; prints `confirmed ID` as each confirm arrives."""
    out = sys.stdout

    def confirmed(env: Envelope) -> None:
        out.write(f"confirmed {env.id.hex()}\n")
        out.flush()

    bodies = [{"n": i} for i in range(args.count)]
    try:
        if args.asyncio:
            async def main() -> None:
                p = AsyncReliableProducer(args.endpoint, args.queue, timeout=args.timeout)
                try:
                    await p.send_many(bodies, on_confirm=confirmed)
                finally:
                    p.close(0)
            asyncio.run(main())
        else:
            p = ReliableProducer(args.endpoint, args.queue, timeout=args.timeout)
            try:
                p.send_many(bodies, on_confirm=confirmed)
            finally:
                p.close(0)
    except Unconfirmed as exc:
        for env in exc.unconfirmed:
            out.write(f"unconfirmed {env.id.hex()}\n")
        out.flush()
        raise SystemExit(3) from None
    print("producer done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("endpoint")
    w.add_argument("log")
    w.add_argument("--queue", default="orders")
    w.add_argument("--window", type=int, default=100)
    w.add_argument("--delay", type=float, default=0.0)
    w.add_argument("--heartbeat", type=float, default=0.5)
    w.add_argument("--poison", type=int, action="append", default=[])
    w.add_argument("--fail-flag")
    w.add_argument("--asyncio", action="store_true")
    p = sub.add_parser("producer")
    p.add_argument("endpoint")
    p.add_argument("count", type=int)
    p.add_argument("--queue", default="orders")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--asyncio", action="store_true")
    args = ap.parse_args()
    worker(args) if args.role == "worker" else producer(args)


if __name__ == "__main__":
    main()


def read_logs(paths: list[Path]) -> list[tuple[str, int, int, int]]:
    """Every line of the worker logs: (id hex, attempt, pid, n)."""
    rows = []
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4:
                    rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return rows
