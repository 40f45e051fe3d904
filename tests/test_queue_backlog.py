"""A producer ahead of its consumers: small messages wait in a bounded backlog and go out as batches,
every one delivered, in order; close() sends the backlog within the linger or says what it dropped."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio

from zfabric import (
    AsyncProducer,
    ConfigError,
    Consumer,
    Producer,
    ReceiveTimeout,
    SendTimeout,
    SocketOptions,
)
from zfabric.patterns._backlog import BACKLOG_BATCH, BACKLOG_MAX, AsyncBacklog, Backlog
from zfabric.patterns.queue import ProducerCounters

from .conftest import Processes, wait_until
from .faces import Face

SMALL = SocketOptions(send_hwm=5, receive_hwm=5)


PAD = "x" * 800
"""Messages of about 850 B, small enough for the backlog, large enough that the OS buffers fill with about 10,000."""


def fill(producer: Any, limit: int = 2_000_000) -> int:
    """Send {"n": 0}, {"n": 1}, ... with a short timeout until the queue and the backlog are full; how many went."""
    sent = 0
    with pytest.raises(SendTimeout, match="queue full"):
        while sent < limit:
            producer.send({"n": sent, "pad": PAD}, timeout=0.2)
            sent += 1
    return sent


def backlog_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("zfabric-backlog")]


def test_small_messages_wait_in_the_backlog_and_arrive_batched_complete_and_in_order(face: Face) -> None:
    with Consumer("tcp://127.0.0.1:0", options=SMALL) as consumer:  # reads nothing until the producer is full
        producer = face.producer(consumer.endpoint, options=SMALL)
        producer.wait_for_consumers(1, timeout=10)
        sent = fill(producer)
        assert producer.stats.send_timeouts == 1
        assert producer.stats.sent == sent
        got = [consumer.receive(timeout=5).body["n"] for _ in range(sent)]
        assert got == list(range(sent))
        with pytest.raises(ReceiveTimeout):
            consumer.receive(timeout=0.2)
        # The backlog was full when send timed out: those messages all went through it, in batches.
        assert producer.stats.backlogged >= BACKLOG_MAX
        assert producer.stats.batches_sent >= BACKLOG_MAX // BACKLOG_BATCH
        assert producer.stats.backlog_dropped == 0
        producer.close()
    assert backlog_threads() == []


def test_messages_of_every_shape_keep_their_order_and_content_behind_the_backlog(face: Face) -> None:
    blob = bytes(range(256)) * 400  # 100 KiB of raw bytes: its own frame, never batched nor copied
    text = "é" * 3000  # a 6 KB string: one frame, too large to batch
    with Consumer("tcp://127.0.0.1:0", options=SMALL) as consumer:
        producer = face.producer(consumer.endpoint, options=SMALL)
        producer.wait_for_consumers(1, timeout=10)
        sent = fill(producer)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(consumer.receive(timeout=10) for _ in range(sent + 500)))
        reader.start()
        expected = []
        for i in range(100):
            producer.send({"tail": i}, timeout=10)
            producer.send(blob, headers={"i": i}, timeout=10)
            producer.send(text, ttl=60, timeout=10)
            producer.send({"tail": i, "h": True}, headers={"trace": str(i)}, timeout=10)
            expected += [{"tail": i}, blob, text, {"tail": i, "h": True}]
        producer.send_batch([{"batch": i} for i in range(50)], timeout=10)  # behind the backlog too
        producer.send_many([{"many": i} for i in range(50)], timeout=10)
        expected += [{"batch": i} for i in range(50)] + [{"many": i} for i in range(50)]
        reader.join(30)
        assert not reader.is_alive()
    assert [env.body["n"] for env in got[:sent]] == list(range(sent))
    assert [env.body for env in got[sent:]] == expected
    assert [env.headers for env in got[sent + 1:sent + 400:4]] == [{"i": i} for i in range(100)]
    assert [env.headers for env in got[sent + 3:sent + 400:4]] == [{"trace": str(i)} for i in range(100)]


def test_close_sends_the_backlog_before_closing(face: Face) -> None:
    """(The asyncio face's close() sends it without awaiting; `async with` awaits it: the test below.)"""
    with Consumer("tcp://127.0.0.1:0", options=SMALL) as consumer:
        producer = face.producer(consumer.endpoint, options=SMALL.replace(linger_ms=30_000))
        producer.wait_for_consumers(1, timeout=10)
        sent = fill(producer)
        got: list[int] = []
        reader = threading.Thread(target=lambda: got.extend(consumer.receive(timeout=10).body["n"] for _ in range(sent)))
        reader.start()
        producer.close()  # returns once the backlog went out (the reader drains meanwhile)
        reader.join(30)
        assert got == list(range(sent))
        assert producer.stats.backlog_dropped == 0
    assert backlog_threads() == []


def test_a_close_whose_linger_runs_out_counts_and_logs_the_backlog_it_dropped(face: Face,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    with Consumer("tcp://127.0.0.1:0", options=SMALL) as consumer:  # never reads
        producer = face.producer(consumer.endpoint, options=SMALL.replace(linger_ms=300))
        producer.wait_for_consumers(1, timeout=10)
        fill(producer)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="zfabric"):
            producer.close()
        assert time.monotonic() - start < 3
        dropped = producer.stats.backlog_dropped
        assert dropped >= BACKLOG_MAX  # the full backlog, and what the flusher had taken out but not sent
        assert f"closed after its whole linger of 300 ms: {dropped} message(s) of its backlog were never sent" \
            in caplog.text
    assert backlog_threads() == []


def test_the_backlog_outlives_a_killed_consumer_and_goes_to_the_next(processes: Processes) -> None:
    """A consumer killed with -9 loses what it held (at-most-once); what waited in the producer's backlog
    was never on that connection, and arrives at the consumer that takes its place, in order."""
    stuck = processes.python("-c", (
        "import time, zmq\n"
        "s = zmq.Context().socket(zmq.PULL)\n"
        "s.rcvhwm = 5\n"
        "s.bind('tcp://127.0.0.1:0')\n"
        "print(s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)\n"
        "time.sleep(120)\n"))
    endpoint = processes.wait_line(stuck, r"tcp://\S+").group(0)
    with Producer(endpoint, options=SMALL) as producer:
        producer.wait_for_consumers(1, timeout=10)
        sent = fill(producer)
        stuck.kill()
        stuck.wait(10)
        with Consumer(endpoint, options=SMALL) as successor:  # same address: the producer reconnects to it
            got = []
            while True:
                try:
                    got.append(successor.receive(timeout=3).body["n"])
                except ReceiveTimeout:
                    break
            producer.send({"n": sent}, timeout=10)  # and the queue goes on
            got.append(successor.receive(timeout=10).body["n"])
    # The killed consumer's share is gone; from there on nothing is missing, and the backlog is all there.
    assert got == list(range(got[0], sent + 1))
    assert got[0] <= sent - BACKLOG_MAX


SPURTS = """
import sys, time
from zfabric import Consumer, ReceiveTimeout, SocketOptions
count = int(sys.argv[1])
with Consumer("tcp://127.0.0.1:0", options=SocketOptions(send_hwm=200, receive_hwm=200)) as consumer:
    print(consumer.endpoint, flush=True)
    n = 0
    try:
        while n < count:
            body = consumer.receive(timeout=10).body
            if body != n:
                sys.exit(f"out of order: message {body} came where {n} was due")
            n += 1
            if n % 500 == 0:
                time.sleep(0.001)  # a pause: the producer's queue fills and its backlog starts
    except ReceiveTimeout:
        sys.exit(f"only {n} of {count} arrived")
    print(f"all {count} in order", flush=True)
"""


def test_a_backlog_that_starts_and_empties_a_thousand_times_keeps_every_message_in_order(processes: Processes) -> None:
    """The producer's thread adds to the backlog without a lock while the flusher sends and empties it, and
    sends straight to the socket once it is empty. A consumer (its own process) that reads in spurts makes
    the backlog start and empty again and again; with the producer's interpreter switching threads every
    10 us, every message arrives once, in order, and without waiting for close() (a producer that sent
    straight while the flusher still held messages, or a flusher that slept through one, failed this)."""
    count = 200_000
    consumer = processes.python("-c", SPURTS, str(count))
    endpoint = processes.wait_line(consumer, r"tcp://\S+").group(0)
    interval = sys.getswitchinterval()
    with Producer(endpoint, options=SocketOptions(send_hwm=200, receive_hwm=200, linger_ms=30_000)) as producer:
        producer.wait_for_consumers(1, timeout=10)
        sys.setswitchinterval(1e-5)
        try:
            for n in range(count):
                producer.send(n, timeout=10)
        finally:
            sys.setswitchinterval(interval)
        out, err = consumer.communicate(timeout=60)  # everything arrives while the producer is open: no close() flush
    assert consumer.returncode == 0, err[-2000:]
    assert f"all {count} in order" in out
    stats = producer.stats
    assert 0 < stats.backlogged < count and stats.batches_sent > 0  # both ways: through the backlog and straight
    assert stats.backlog_dropped == 0
    assert backlog_threads() == []


def test_a_flusher_woken_for_nothing_goes_back_to_sleep_ready_to_be_woken_again() -> None:
    """A wake-up can find the backlog empty: the producer read `idle` before the message it woke the flusher
    for went out. The flusher must then sleep as before, so that the next message still wakes it (it slept
    with `idle` cleared once, and every later message waited behind a flusher nobody would wake: found by
    the test above, in about 1 run of 15)."""
    with zmq.Context() as ctx:
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(f"tcp://127.0.0.1:{port}")
        backlog = Backlog(push, "test", ProducerCounters())
        with backlog.lock:
            assert backlog.put([b"first"], timeout=1)  # starts the flusher, which sends it and goes to sleep
        assert pull.poll(5000) and pull.recv() == b"first"
        assert wait_until(lambda: backlog.idle)
        with backlog.lock:
            backlog._wake()  # late: the message it was for is gone
        assert wait_until(lambda: backlog.idle)  # asleep again, and saying so
        assert backlog.take(b"second")
        assert pull.poll(5000), "the flusher slept through a message"
        assert pull.recv() == b"second"
        assert backlog.close(1) == 0
        push.close()
        pull.close()
    assert backlog_threads() == []


def test_no_backlog_without_a_consumer(face: Face) -> None:
    """With no consumer at all, a send blocks or times out, as the queue promises; nothing is parked."""
    with Consumer("tcp://127.0.0.1:0") as gone:
        endpoint = gone.endpoint
    producer = face.producer(endpoint)
    for _ in range(3):
        with pytest.raises(SendTimeout):
            producer.send({"n": 1}, timeout=0.2)
    assert producer.stats.backlogged == 0 and producer.stats.sent == 0



@pytest.mark.parametrize("bound", [0, 50])
def test_a_producer_with_a_smaller_backlog_or_none_loses_nothing_and_keeps_order(face: Face, bound: int) -> None:
    with Consumer("tcp://127.0.0.1:0", options=SMALL) as consumer:  # reads nothing until the producer is full
        producer = face.producer(consumer.endpoint, options=SMALL, backlog=bound)
        producer.wait_for_consumers(1, timeout=10)
        sent = fill(producer)
        got = [consumer.receive(timeout=5).body["n"] for _ in range(sent)]
        assert got == list(range(sent))
        with pytest.raises(ReceiveTimeout):
            consumer.receive(timeout=0.2)
        assert producer.stats.send_timeouts == 1
        if bound == 0:  # every message went straight to ZeroMQ, as through a raw PUSH socket
            assert producer.stats.backlogged == 0
            assert producer.stats.batches_sent == 0
            assert backlog_threads() == []
        else:
            assert producer.stats.backlogged > 0
        producer.close()
    assert backlog_threads() == []


def test_a_backlog_takes_no_more_than_its_bound() -> None:
    """Against a socket nobody takes from, the backlog fills to its bound and then refuses, and close() counts
    everything it took as dropped."""
    with zmq.Context() as ctx:
        sock = ctx.socket(zmq.PUSH)
        sock.bind("tcp://127.0.0.1:0")  # no consumer: the flusher can never send
        stats = ProducerCounters()
        backlog = Backlog(sock, "test", stats)
        backlog.limit = 3
        with backlog.lock:
            assert backlog.put([b"first"], timeout=1)  # turns it on; the flusher takes it and waits for room
        deadline = time.monotonic() + 5
        while backlog.waiting and time.monotonic() < deadline:  # until the flusher has taken it out
            time.sleep(0.01)
        assert backlog.active and not backlog.idle
        taken = 0
        while backlog.take(b"more"):  # the producer's own thread: no lock
            taken += 1
            assert taken <= 3
        with backlog.lock:
            assert not backlog.put([b"refused"], timeout=0.1)
        assert taken == 3
        assert backlog.close(0.2) == 4  # the first, stuck in the flusher, and the three behind it
        assert stats.backlog_dropped == 4 and stats.backlogged == 4 and not backlog.waiting
        sock.close(0)
    assert backlog_threads() == []


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_a_backlog_that_is_not_a_count_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="backlog: expected a number of messages"):
        Producer("inproc://never-connected", backlog=bad)


def test_async_with_awaits_the_backlog_before_closing_without_holding_up_the_loop() -> None:
    """`async with` sends what the backlog holds while the event loop keeps running; nothing is dropped."""
    got: list[int] = []

    def read(consumer: Consumer, count: int) -> None:
        time.sleep(0.2)  # the producer is in `async with`'s exit, waiting for room, by then
        got.extend(consumer.receive(timeout=10).body["n"] for _ in range(count))

    async def scenario(consumer: Consumer) -> tuple[int, int, AsyncProducer, threading.Thread]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        async with AsyncProducer(consumer.endpoint, options=SMALL.replace(linger_ms=30_000)) as producer:
            await producer.wait_for_consumers(1, timeout=10)
            sent = 0
            with pytest.raises(SendTimeout, match="queue full"):
                while sent < 2_000_000:
                    await producer.send({"n": sent, "pad": PAD}, timeout=0.2)
                    sent += 1
            reader = threading.Thread(target=read, args=(consumer, sent))
            reader.start()
            ticker = asyncio.create_task(tick())
        ticker.cancel()
        return sent, ticks, producer, reader

    with Consumer("tcp://127.0.0.1:0", options=SMALL) as consumer:  # reads nothing until the producer is full
        sent, ticks, producer, reader = asyncio.run(scenario(consumer))
        reader.join(30)
    assert got == list(range(sent))
    assert producer.stats.backlogged >= BACKLOG_MAX and producer.stats.backlog_dropped == 0
    assert ticks >= 50  # the loop ran other tasks (a 1 ms ticker) all the while the backlog waited and drained


def test_an_asyncio_backlog_takes_no_more_than_its_bound() -> None:
    """Against a socket nobody takes from, the asyncio backlog fills to its bound and then refuses (waiting no
    longer than the timeout), and close() counts everything it took as dropped."""

    async def scenario() -> tuple[int, bool, int]:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.bind("tcp://127.0.0.1:0")  # no consumer: nothing can be sent
        backlog = AsyncBacklog(zmq.Socket.shadow(sock.underlying), sock, "test", ProducerCounters())
        backlog.limit = 3
        assert backlog.add([b"first"])  # turns it on and starts the task, which cannot send it
        taken = 0
        while backlog.take(b"more"):
            taken += 1
            assert taken <= 3
        refused = not await backlog.put([b"refused"], timeout=0.1)
        dropped = backlog.close(0.2)
        await asyncio.sleep(0)  # the flusher task ends (cancelled) before its socket closes
        sock.close(0)
        ctx.term()
        return taken, refused, dropped

    assert asyncio.run(scenario()) == (2, True, 3)  # the first and two behind it
