"""The queue rate zfabric's codec alone allows: what no rework of the classes around it can exceed.

Four implementations of the same queue run take turns, each a producer and a consumer process:
raw pyzmq passing the body as it is; raw msgpack-encoding it (issue 5's "no envelope, just msgpack");
`zf-codec`, plain pyzmq sockets with nothing but zfabric's encode (`Stamp.plain`, then `send`) on one
side and its decode (a `zmq.Frame`, then `decode_message`: `unpackb` and the check of every header
field) on the other; and zfabric itself (`Producer.send`, `Consumer.receive`).

    python benchmarks/codec_ceiling.py --size 4096 --runs 8        # about two minutes
"""

from __future__ import annotations

import argparse
import statistics

from zfabric.bench.suite import queue_rate
from zfabric.codec import INLINE_MAX

IMPLS = ("raw", "raw-msgpack", "zf-codec", "zf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help=f"body size in bytes, under {INLINE_MAX} (default 4096)")
    parser.add_argument("--count", type=int, default=200_000, help="messages a run")
    parser.add_argument("--runs", type=int, default=8, help="runs of each implementation, taking turns")
    args = parser.parse_args()
    if not 0 < args.size < INLINE_MAX:
        parser.error(f"--size must be under {INLINE_MAX}: larger bytes bodies travel as a frame of their own, "
                     "which the bare codec loop does not do")
    rates: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for run in range(1, args.runs + 1):
        for impl in IMPLS:
            rates[impl].append(queue_rate(impl, args.count, args.size)[0])
        print(f"run {run}: " + ", ".join(f"{impl} {rates[impl][-1]:,.0f}" for impl in IMPLS), flush=True)
    medians = {impl: statistics.median(values) for impl, values in rates.items()}
    print(f"\nmedians of {args.runs} runs, {args.size} B bodies, msg/s:")
    for impl in IMPLS:
        ratios = ", ".join(f"{medians[impl] / medians[base]:.2f}x of {base}" for base in ("raw", "raw-msgpack")
                           if base != impl and IMPLS.index(base) < IMPLS.index(impl))
        print(f"  {impl:12s} {medians[impl]:>10,.0f}   {ratios}")


if __name__ == "__main__":
    main()
