"""What the sidecar's SQLite store costs per message, without sockets: the floor under the reliable queue.

Runs the store's own hot path (zfabric.sidecar.store.Store) the way a busy sidecar pass
does: reserve ids, insert the new rows, mark the previous pass's messages delivered and the
pass before that's acknowledged, commit. Prints microseconds per message for each step.

    python benchmarks/sidecar_store.py                  # synchronous=full, passes of 200
    python benchmarks/sidecar_store.py --synchronous normal --pass-size 500
    python benchmarks/sidecar_store.py --inserts-only   # no delivery or ack updates: the bare floor
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from zfabric.sidecar.store import Entry, Store


def run(messages: int, pass_size: int, synchronous: str, inserts_only: bool) -> dict[str, float]:
    spent = dict.fromkeys(("reserve", "insert", "delivered", "done", "commit"), 0.0)
    header, body = os.urandom(60), os.urandom(100)
    origin = os.urandom(8)
    clock = time.perf_counter
    with tempfile.TemporaryDirectory(prefix="zf-store-bench-") as tmp:
        store = Store(os.path.join(tmp, "bench.db"), synchronous=synchronous)
        delivered: list[Entry] = []
        acked: list[Entry] = []
        counter = 0
        for _ in range(messages // pass_size):
            ids = [origin + (counter + i).to_bytes(8, "big") for i in range(pass_size)]
            counter += pass_size
            t0 = clock()
            store.begin()
            seqs = store.reserve(ids)
            t1 = clock()
            entries = [Entry(seq, ident, "bench", header, body) for seq, ident in zip(seqs, ids) if seq is not None]
            store.insert(entries, time.time())
            t2 = clock()
            if delivered and not inserts_only:
                for e in delivered:
                    e.attempts, e.worker = 1, "worker/0001"
                store.mark_delivered(delivered)
            t3 = clock()
            if acked and not inserts_only:
                now = time.time()  # one clock reading per pass, as the sidecar's
                store.mark_done(acked, now)
            t4 = clock()
            store.commit()
            t5 = clock()
            for key, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                spent[key] += took
            acked, delivered = delivered, entries
        store.close()
    done = messages // pass_size * pass_size
    return {key: took / done * 1e6 for key, took in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--pass-size", type=int, default=200, help="messages per transaction (one sidecar pass)")
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--inserts-only", action="store_true", help="skip the delivery and ack updates")
    args = parser.parse_args()
    per = run(args.messages, args.pass_size, args.synchronous, args.inserts_only)
    total = sum(per.values())
    print(" ".join(f"{key} {us:.2f}" for key, us in per.items()) + f"  total {total:.2f} us a message "
          f"(a sidecar doing only this could store at most {1e6 / total:,.0f} msg/s on one core)")


if __name__ == "__main__":
    main()
