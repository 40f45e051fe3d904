"""Publish-subscribe through a real forwarder: every message to every subscriber, gaps counted."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zfabric import (
    ConfigError,
    EncodeError,
    Envelope,
    Forwarder,
    Kind,
    Publisher,
    ReadyTimeout,
    ReceiveTimeout,
    SocketOptions,
    Subscriber,
    codec,
)
from zfabric.patterns.forwarder import ForwarderProcess

from .conftest import wait_until
from .faces import Face

BIG = SocketOptions(send_hwm=0, receive_hwm=0)


@pytest.fixture
def roomy_forwarder() -> Iterator[ForwarderProcess]:
    """A forwarder process with no high-water mark, so nothing may be lost on the way."""
    fwd = ForwarderProcess(extra_args=["--hwm", "0"]).start()
    yield fwd
    fwd.stop()


@pytest.fixture
def thread_forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
    yield fwd
    fwd.stop()


def collect(sub: Any, count: int, out: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            for _ in range(count):
                out.append(sub.receive(timeout=10.0))
        except ReceiveTimeout:
            pass

    t = threading.Thread(target=run)
    t.start()
    return t


def test_every_subscriber_gets_every_message_of_its_topic_in_order(face: Face, roomy_forwarder: ForwarderProcess) -> None:
    fwd = roomy_forwarder
    sales = [face.subscriber(fwd.xpub_endpoint, topics="sales.", options=BIG) for _ in range(3)]
    audit = face.subscriber(fwd.xpub_endpoint, topics="audit.", options=BIG)
    for s in [*sales, audit]:
        s.wait_ready(timeout=10.0)
    publisher = face.publisher(fwd.xsub_endpoint, options=BIG)
    assert publisher.wait_for_subscribers(3, "sales.eu", timeout=10.0) == 3
    n = 10_000
    outs: list[list[Any]] = [[] for _ in sales]
    threads = [collect(s, n, out) for s, out in zip(sales, outs)]
    for i in range(n):
        publisher.publish("sales.eu", {"n": i})
    for t in threads:
        t.join(120)
    for s, out in zip(sales, outs):
        assert [e.body["n"] for e in out] == list(range(n))
        assert {e.topic for e in out} == {"sales.eu"}
        assert s.gaps == 0
    with pytest.raises(ReceiveTimeout):
        audit.receive(timeout=0.3)


def test_a_slow_subscriber_counts_exactly_the_messages_it_missed(face: Face, forwarder_proc: ForwarderProcess) -> None:
    fwd = forwarder_proc
    slow = face.subscriber(fwd.xpub_endpoint, topics="ticks", options=SocketOptions(receive_hwm=10))
    slow.wait_ready(timeout=10.0)
    publisher = face.publisher(fwd.xsub_endpoint)
    publisher.wait_for_subscribers(1, "ticks", timeout=10.0)
    burst, blob = 3000, b"x" * 8192
    for i in range(burst):
        publisher.publish("ticks", [i, blob])
    received: list[int] = []
    while True:
        try:
            received.append(slow.receive(timeout=1.0).body[0])
        except ReceiveTimeout:
            break
    publisher.publish("ticks", [burst, b""])  # makes any loss at the tail visible as a gap
    assert slow.receive(timeout=10.0).body[0] == burst
    missed = burst - len(received)
    assert missed > 0, "the burst did not overflow the high-water mark; the test proves nothing"
    assert received == sorted(received)
    assert slow.gaps == missed


def test_a_message_published_right_after_the_handshake_is_never_lost(face: Face, thread_forwarder: Forwarder) -> None:
    fwd = thread_forwarder
    publisher = face.publisher(fwd.xsub_endpoint)
    for i in range(20):
        topic = f"join.{i}"
        sub = face.subscriber(fwd.xpub_endpoint, topics=topic)
        sub.wait_ready(timeout=10.0)
        publisher.wait_for_subscribers(1, topic, timeout=10.0)
        publisher.publish(topic, i)
        assert sub.receive(timeout=5.0).body == i
        sub.close()


def test_publisher_sees_subscribers_come_and_go(face: Face, thread_forwarder: Forwarder) -> None:
    fwd = thread_forwarder
    publisher = face.publisher(fwd.xsub_endpoint)
    with pytest.raises(ReadyTimeout, match="0 of 1 subscriber"):
        publisher.wait_for_subscribers(1, "orders", timeout=0.3)
    subs = [face.subscriber(fwd.xpub_endpoint, topics=t) for t in ("orders", "orders.eu", "other")]
    assert publisher.wait_for_subscribers(2, "orders.eu.1", timeout=10.0) == 2
    assert fwd.subscribers("orders") == 1
    subs[1].close()

    def one_left() -> bool:
        publisher.poll_control()
        return publisher.subscribers("orders.eu.1") == 1

    assert wait_until(one_left)
    assert wait_until(lambda: fwd.stats.subscriptions == 2)


def test_direct_publisher_without_forwarder(face: Face) -> None:
    publisher = face.publisher("tcp://127.0.0.1:0", bind=True)
    assert publisher.direct
    sub = face.subscriber(publisher.endpoint, topics="t")
    assert publisher.wait_for_subscribers(1, "t", timeout=10.0) == 1
    publisher.publish("t", "hello")
    assert sub.receive(timeout=5.0).body == "hello"


def test_forwarder_counts_traffic_and_rejects_forged_control_topics(thread_forwarder: Forwarder, sync_face: Face, ctx: zmq.Context) -> None:
    fwd = thread_forwarder
    everything = sync_face.subscriber(fwd.xpub_endpoint, topics="")
    everything.wait_ready(timeout=10.0)
    forger = ctx.socket(zmq.XPUB)  # XPUB, so it can see the forwarder's subscriptions arrive
    forger.connect(fwd.xsub_endpoint)
    seen: list[bytes] = []
    while b"\x01" not in seen:  # the catch-all subscription of `everything`
        assert forger.poll(5000, zmq.POLLIN), f"forwarder never sent its subscriptions: {seen}"
        seen.append(forger.recv())
    publisher = sync_face.publisher(fwd.xsub_endpoint)
    publisher.wait_for_subscribers(1, "a", timeout=10.0)
    forger.send_multipart([b"\x00zf?forged", b"x"])
    for i in range(5):
        publisher.publish("a", i)
    assert [everything.receive(timeout=5.0).body for _ in range(5)] == [0, 1, 2, 3, 4]
    assert wait_until(lambda: fwd.stats.rejected == 1)
    assert fwd.stats.messages_out == 5
    assert fwd.stats.probes >= 1


def test_subscriber_skips_garbage_and_keeps_delivering(face: Face, ctx: zmq.Context) -> None:
    raw = ctx.socket(zmq.XPUB)
    raw.bind("tcp://127.0.0.1:0")
    sub = face.subscriber(raw.getsockopt_string(zmq.LAST_ENDPOINT), topics="t")
    assert raw.poll(5000, zmq.POLLIN)
    assert raw.recv() == b"\x01t"

    def valid(i: int) -> list[bytes]:
        env = Envelope(b"p" * 16, Kind.MESSAGE, "t", i, seq=i + 1, created_at=time.time())
        return [bytes(f) for f in codec.encode_published(env)]

    for i in range(10):
        raw.send_multipart(valid(i))
        raw.send_multipart([b"t", b"garbage"])
        raw.send_multipart([b"tt", b"\x93\x01", b"x", b"y"])
    mislabelled = Envelope(b"p" * 16, Kind.MESSAGE, "tx", "not for t", seq=99, created_at=time.time())
    raw.send_multipart([b"t", *[bytes(f) for f in codec.encode(mislabelled)]])  # its topic frame is not its header's
    raw.send_multipart(valid(10))
    assert [sub.receive(timeout=5.0).body for _ in range(11)] == list(range(11))
    assert sub.stats.decode_errors == 21
    assert sub.gaps == 0


def test_a_body_that_cannot_be_published_leaves_no_gap(face: Face) -> None:
    """A failed publish takes no sequence number: subscribers must not count a message that never existed."""
    publisher = face.publisher("tcp://127.0.0.1:0", bind=True)
    sub = face.subscriber(publisher.endpoint, topics="t", options=BIG)
    assert publisher.wait_for_subscribers(1, "t", timeout=10.0) == 1
    bodies: list[Any] = [1, b"small", b"L" * codec.INLINE_MAX, "text"]
    publisher.publish("t", bodies[0])
    for bad, headers in ((object(), None), ({"k": object()}, None), ("fine", {"h": object()})):
        with pytest.raises(EncodeError):
            publisher.publish("t", bad, headers=headers)
    for body in bodies[1:]:
        publisher.publish("t", body)
    got = [sub.receive(timeout=5.0) for _ in bodies]
    assert [e.body for e in got] == bodies
    assert [e.seq for e in got] == [1, 2, 3, 4]
    assert sub.gaps == 0


def test_reserved_topics_are_refused(face: Face, thread_forwarder: Forwarder) -> None:
    publisher = face.publisher(thread_forwarder.xsub_endpoint)
    with pytest.raises(ConfigError, match="reserved"):
        publisher.publish("\x00zf?x", 1)
    sub = face.subscriber(thread_forwarder.xpub_endpoint)
    with pytest.raises(ConfigError, match="reserved"):
        sub.subscribe("\x00")
    with pytest.raises(ConfigError, match="not subscribed"):
        sub.unsubscribe("never")


def test_publishing_resumes_after_the_forwarder_is_killed_and_restarted(face: Face) -> None:
    first = ForwarderProcess().start()
    try:
        sub = face.subscriber(first.xpub_endpoint, topics="orders")
        sub.wait_ready(timeout=10.0)
        publisher = face.publisher(first.xsub_endpoint)
        publisher.wait_for_subscribers(1, "orders", timeout=10.0)
        publisher.publish("orders", "before")
        assert sub.receive(timeout=5.0).body == "before"
        first.kill()
    finally:
        first.kill()
    second = ForwarderProcess(first.xsub_endpoint, first.xpub_endpoint).start()
    try:
        sub.wait_ready(timeout=10.0)
        publisher.wait_for_subscribers(1, "orders", timeout=10.0)
        assert publisher.subscribers("orders") == 1, "a count from the dead forwarder lingered"
        publisher.publish("orders", "after")
        assert sub.receive(timeout=5.0).body == "after"
        assert sub.gaps == 0
    finally:
        second.stop()


PUBLISH_AND_EXIT = """
import sys
from zfabric import Publisher, SocketOptions
count, address = int(sys.argv[1]), sys.argv[2]
options = SocketOptions(send_hwm=0, heartbeat_ivl_ms=100, linger_ms=30_000)
with Publisher(address, bind=True, options=options) as publisher:
    print(publisher.endpoint, flush=True)
    publisher.wait_for_subscribers(1, "t", timeout=10)
    for n in range(count):
        publisher.publish("t", n)
"""


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_publisher_that_exits_while_its_subscriber_lags_loses_nothing(processes: Any, ipc_dir: Any,
                                                                       transport: str) -> None:
    """A publisher with no high-water mark publishes a burst and exits; the lagging subscriber still gets all of it.

    tcp: a subscriber's ZMTP ping reaching the closed publisher made Linux reset the connection, which threw away
    everything still in flight. ipc: libzmq drops what the kernel still holds for a subscriber whose queue is full
    when the publisher hangs up, unless the publisher waits until it has been read.
    """
    count = 60_000
    address = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{ipc_dir}/burst"
    publisher = processes.python("-c", PUBLISH_AND_EXIT, str(count), address)
    endpoint = processes.wait_line(publisher, r"^((tcp|ipc)://\S+)").group(1)
    with Subscriber(endpoint, topics="t", options=SocketOptions(heartbeat_ivl_ms=100)) as sub:
        got: list[int] = []
        try:
            while len(got) < count:
                got.append(sub.receive(timeout=5).body)
                if len(got) % 200 == 0:
                    time.sleep(0.001)
        except ReceiveTimeout:
            pass
        assert publisher.wait(timeout=30) == 0
        assert len(got) == count, f"{count - len(got)} of {count} messages lost (the publisher exited after publishing)"
        assert got == list(range(count)) and sub.gaps == 0


def test_an_asyncio_publisher_sees_a_subscriber_arrive_while_another_task_publishes() -> None:
    """wait_for_subscribers in one task while another publishes without pause: a publish may read the
    subscription (and the socket's signal) first, and the waiter must still see it, well before its timeout."""
    import asyncio

    from zfabric import AsyncPublisher

    async def main() -> tuple[int, float]:
        async with AsyncPublisher("tcp://127.0.0.1:0", bind=True) as publisher:
            stop = False

            async def publish() -> None:
                n = 0
                while not stop:
                    await publisher.publish("t", n)
                    n += 1
                    if n % 2000 == 0:  # long bursts: its drains, not the waiter, tend to read the subscription
                        await asyncio.sleep(0)

            busy = asyncio.ensure_future(publish())
            await asyncio.sleep(0.05)
            with Subscriber(publisher.endpoint, topics="t"):
                start = time.monotonic()
                found = await publisher.wait_for_subscribers(1, "t", timeout=5.0)
                took = time.monotonic() - start
            stop = True
            await busy
        return found, took

    found, took = asyncio.run(asyncio.wait_for(main(), 30))
    assert found == 1
    assert took < 4.0, f"the subscriber was seen only after {took:.1f} s"


@pytest.mark.parametrize(("transport", "pad"), [("tcp", 256), ("ipc", 0)], ids=["tcp", "ipc"])
def test_a_forwarder_stopped_while_its_subscriber_lags_hands_over_what_it_forwarded(ipc_dir: Any, transport: str,
                                                                                    pad: int) -> None:
    """SIGTERM stops a forwarder from taking more, and gives its subscribers `linger_ms` to take what it already
    forwarded. Before, it closed at once and dropped what it still held for a lagging subscriber (over tcp that
    shows once the burst outgrows the kernel's buffers, hence the padding). Over ipc it must also wait until the
    subscriber has read what the kernel holds (libzmq#4660, see close_handing_over): 360-500 small messages were
    lost without that wait."""
    count, padding = 60_000, "x" * pad
    if transport == "tcp":
        xsub, xpub = "tcp://127.0.0.1:0", "tcp://127.0.0.1:0"
    else:
        xsub, xpub = f"ipc://{ipc_dir}/xsub", f"ipc://{ipc_dir}/xpub"
    fwd = ForwarderProcess(xsub, xpub, extra_args=["--hwm", "0"]).start()  # no high-water mark: nothing dropped on the way
    try:
        with Subscriber(fwd.xpub_endpoint, topics="t") as sub, Publisher(fwd.xsub_endpoint, options=BIG) as publisher:
            sub.wait_ready(timeout=10.0)
            publisher.wait_for_subscribers(1, "t", timeout=10.0)
            for n in range(count):
                publisher.publish("t", [n, padding])

            def forwarded_all() -> bool:
                fwd.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
                time.sleep(0.05)
                return any(f"messages_out={count} " in line for line in fwd.output)

            assert wait_until(forwarded_all, timeout=10.0)
            fwd.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            got = []
            try:
                while len(got) < count:
                    got.append(sub.receive(timeout=3.0).body[0])
                    if len(got) % 200 == 0:
                        time.sleep(0.001)  # lagging (its queue stays full), but done within the forwarder's linger
            except ReceiveTimeout:
                pass
            assert fwd.proc.wait(10) == 0  # type: ignore[union-attr]
        assert len(got) == count, f"{count - len(got)} of {count} forwarded messages were lost when the forwarder stopped"
        assert got == list(range(count))
    finally:
        fwd.kill()


def test_a_subscriber_whose_forwarder_died_closes_at_once_and_quietly(face: Face, caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber sends only subscriptions: nothing of the user's is lost by not flushing them, so closing does not
    wait out the linger for a forwarder that is gone (it took the whole second and warned of dropped messages)."""
    fwd = ForwarderProcess().start()
    try:
        sub = face.subscriber(fwd.xpub_endpoint, topics="t")
        sub.wait_ready(timeout=10.0)
    finally:
        fwd.kill()
    time.sleep(0.2)  # let the subscriber see the connection drop
    with caplog.at_level(logging.WARNING, logger="zfabric"):
        started = time.monotonic()
        sub.close()
        took = time.monotonic() - started
    assert took < 0.5, f"close took {took:.2f} s"
    assert "linger" not in caplog.text
