"""What a consumer that stops reading holds: zfabric's Producer (its backlog batches under back-pressure)
against raw pyzmq PUSH, in the same run.

One producer, two consumers over tcp loopback: one reads everything, the other never reads but
keeps its connection, as a hung worker does. Messages go to the stuck one until its high-water
marks and the kernel's buffers are full; what it holds is lost if it dies (at-most-once), and
waits for it if it resumes. Prints, per side, how many messages the stuck consumer holds.

    python benchmarks/stuck_consumer.py                       # 1,500,000 messages of ~100 B
    python benchmarks/stuck_consumer.py --messages 500000
    python benchmarks/stuck_consumer.py --messages 300000 --size 4096
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

import msgpack
import zmq

from zfabric import Consumer, Producer, ReceiveTimeout, SendTimeout


def reader(receive: Callable[[], bool]) -> tuple[list[int], threading.Event, threading.Thread]:
    """A thread counting what `receive` (True: got one) takes until the event is set."""
    count, stop = [0], threading.Event()

    def run() -> None:
        while not stop.is_set():
            if receive():
                count[0] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return count, stop, thread


def held_raw(messages: int, body: str) -> int:
    ctx = zmq.Context()
    fast, stuck, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in (fast, stuck)]
        push.setsockopt(zmq.IMMEDIATE, 1)
        for port in ports:
            push.connect(f"tcp://127.0.0.1:{port}")
        fast.setsockopt(zmq.RCVTIMEO, 200)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        time.sleep(0.5)  # both connections up (IMMEDIATE: no message parks on a pending one)

        def receive() -> bool:
            try:
                fast.recv()
                return True
            except zmq.Again:
                return False

        count, stop, thread = reader(receive)
        sent = 0
        try:
            for n in range(messages):
                push.send(msgpack.packb([n, body]))
                sent += 1
        except zmq.Again:
            pass
        time.sleep(1.0)  # the fast reader takes what is still on its way to it
        stop.set()
        thread.join(5)
        return sent - count[0]
    finally:
        for s in (fast, stuck, push):
            s.close(0)
        ctx.term()


def held_zfabric(messages: int, body: str) -> tuple[int, int]:
    """(messages the stuck consumer holds, batches the producer's backlog sent)."""
    with Consumer("tcp://127.0.0.1:0") as fast, Consumer("tcp://127.0.0.1:0") as stuck:
        with Producer([fast.endpoint, stuck.endpoint], send_timeout=2.0) as producer:
            producer.wait_for_consumers(2, timeout=10)

            def receive() -> bool:
                try:
                    fast.receive(timeout=0.2)
                    return True
                except ReceiveTimeout:
                    return False

            count, stop, thread = reader(receive)
            sent = 0
            try:
                for n in range(messages):
                    producer.send([n, body])
                    sent += 1
            except SendTimeout:  # the stuck consumer's share is full and the fast one fell 2 s behind
                pass
            time.sleep(1.0)
            stop.set()
            thread.join(5)
            held = sent - count[0], producer.stats.batches_sent
            producer.close(linger_ms=0)  # what the stuck consumer holds is dropped with it: no warning wanted
            return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_500_000)
    parser.add_argument("--size", type=int, default=80, help="body bytes of each message (default 80: ~100 B a message)")
    args = parser.parse_args()
    body = "x" * args.size
    raw = held_raw(args.messages, body)
    zf, batches = held_zfabric(args.messages, body)
    print(f"messages sent: {args.messages:,} ({args.size:,} B bodies), default high-water marks (1,000)")
    print(f"raw pyzmq PUSH: the stuck consumer holds {raw:,}")
    print(f"zfabric Producer: the stuck consumer holds {zf:,} ({zf / max(1, raw):.2f}x raw; {batches:,} backlog batches sent)")


if __name__ == "__main__":
    main()
