"""CPU instructions per message of each side of a pattern, zfabric against raw pyzmq: a count that,
unlike a rate, does not move with the load of a shared machine.

Each measured side is the benchmark's own actor (`zfabric/bench/actors.py`), run under valgrind's
callgrind twice, for a short and a long run; the difference of the two instruction counts divided
by the difference of their message counts is what one more message costs that process: its Python
code, msgpack, libzmq and its I/O thread, start-up and tear-down cancelled out. The other side runs
at full speed, outside valgrind. The count leaves out the kernel (the system calls) and cache misses:
it says how much work each side does, a rate says how fast the machine did it.

    python benchmarks/instructions.py                        # every role, about 11 minutes
    python benchmarks/instructions.py --roles requester,replier --short 500 --long 2500
    python benchmarks/instructions.py --roles producer,consumer --size 4096   # the 4 KiB row's two sides

Needs valgrind (`apt install valgrind`). Roles (bodies of `--size`, 100 B by default):
  producer   sends msgpack bodies to a consumer that keeps up
  consumer   receives them from a producer that outruns it (valgrind slows the measured side about
             fifty-fold, so zfabric's producer sends batches from its backlog, as under back-pressure)
  requester  100 requests in flight, one per message (zfabric: request_many(batch=1)), to an echo replier
  replier    answers such a requester
  alone      a requester with one request in flight (`request()`, the p50 row), per round trip
  alone-replier  the replier that answers it, per request
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

ACTORS = [sys.executable, "-m", "zfabric.bench.actors"]
IMPLS = ("raw", "zf")
ROLES = ("producer", "consumer", "requester", "replier", "alone", "alone-replier")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _spawn(role: str, **args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([*ACTORS, role, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _measured(role: str, **args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *ACTORS, role,
                             json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _endpoint(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{") and "endpoint" in (fields := json.loads(line)):
            return str(fields["endpoint"])
    raise RuntimeError(f"no endpoint from {proc.args!r}: {proc.stderr.read() if proc.stderr else ''}")


def _instructions(proc: subprocess.Popen[str], timeout: float) -> int:
    """The instruction count valgrind reports once the measured process ended."""
    _, err = proc.communicate(timeout=timeout)
    found = _REFS.findall(err)
    if proc.returncode not in (0, -15) or not found:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} ended with {proc.returncode}:\n{err[-3000:]}")
    return int(found[-1].replace(",", ""))


def _stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def producer(impl: str, count: int, size: int) -> int:
    pull = _spawn("queue-pull", impl=impl, count=count, size=size)
    try:
        push = _measured("queue-push", impl=impl, endpoint=_endpoint(pull), count=count, size=size)
        return _instructions(push, 600)
    finally:
        _stop(pull)


def consumer(impl: str, count: int, size: int) -> int:
    pull = _measured("queue-pull", impl=impl, count=count, size=size)
    push = None
    try:
        push = _spawn("queue-push", impl=impl, endpoint=_endpoint(pull), count=count, size=size)
        return _instructions(pull, 600)
    finally:
        _stop(pull, *([push] if push else []))


def requester(impl: str, count: int, size: int) -> int:
    server = _spawn("echo-server", impl=impl)
    try:
        client = _measured("rr-client", impl=impl, endpoint=_endpoint(server), count=count, inflight=100, size=size,
                           batch=1)
        return _instructions(client, 600)
    finally:
        _stop(server)


def alone(impl: str, count: int, size: int) -> int:
    server = _spawn("echo-server", impl=impl)
    try:
        return _instructions(_measured("rr-client", impl=impl, endpoint=_endpoint(server), count=count, inflight=1,
                                       size=size), 600)
    finally:
        _stop(server)


def _replier(impl: str, count: int, inflight: int, size: int) -> int:
    server = _measured("echo-server", impl=impl)
    try:
        client = _spawn("rr-client", impl=impl, endpoint=_endpoint(server), count=count, inflight=inflight, size=size,
                        batch=1)
        client.communicate(timeout=600)
        server.terminate()  # valgrind reports the count of a process ended by SIGTERM
        return _instructions(server, 60)
    finally:
        _stop(server)


def replier(impl: str, count: int, size: int) -> int:
    return _replier(impl, count, 100, size)


def alone_replier(impl: str, count: int, size: int) -> int:
    return _replier(impl, count, 1, size)


MEASURES: dict[str, Callable[[str, int, int], int]] = {
    "producer": producer, "consumer": consumer, "requester": requester, "replier": replier, "alone": alone,
    "alone-replier": alone_replier,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated, of {', '.join(ROLES)}")
    parser.add_argument("--short", type=int, help="messages of the short run (default: by role)")
    parser.add_argument("--long", type=int, help="messages of the long run (default: by role)")
    parser.add_argument("--size", type=int, default=100,
                        help="payload bytes (default 100: a msgpack map; above 1024, raw bytes, as `zfabric bench` sends)")
    parser.add_argument("-o", "--output", help="also write the figures as JSON to this file")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: this benchmark counts instructions with valgrind's callgrind")
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = [r for r in roles if r not in MEASURES]
    if unknown:
        sys.exit(f"unknown role(s) {', '.join(unknown)}: choose from {', '.join(ROLES)}")
    plan = []
    for role in roles:
        short = args.short or {"requester": 2_000, "replier": 2_000, "alone": 300, "alone-replier": 300}.get(role, 20_000)
        long = args.long or short * 5
        if not 0 < short < long:
            sys.exit(f"--short must be above 0 and below --long, got {short} and {long}")
        plan.append((role, short, long))
    results: dict[str, dict[str, float]] = {}
    print(f"{'role':<13} {'raw pyzmq':>14} {'zfabric':>14} {'zfabric/raw':>12}   (instructions per message)")
    for role, short, long in plan:
        per = {}
        for impl in IMPLS:
            counts = [MEASURES[role](impl, n, args.size) for n in (short, long)]
            per[impl] = (counts[1] - counts[0]) / (long - short)
        results[role] = {**per, "ratio": per["zf"] / per["raw"], "short": short, "long": long, "size": args.size}
        print(f"{role:<13} {per['raw']:>14,.0f} {per['zf']:>14,.0f} {per['zf'] / per['raw']:>11.2f}x", flush=True)
    if args.output:
        with open(args.output, "w") as out:
            json.dump({"instructions_per_message": results, "python": platform.python_version(),
                       "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgpack": msgpack.version}, out,
                      indent=2)


if __name__ == "__main__":
    main()
