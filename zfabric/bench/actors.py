"""The processes a benchmark starts: `python -m zfabric.bench.actors ROLE 'JSON args'`.

Each role prints JSON lines on stdout: `{"endpoint": ...}` when it is listening, and one
final `{"result": ...}`. Every role exists in two implementations, `raw` (plain pyzmq,
msgpack bodies, no envelope) and `zf` (zfabric), doing the same work, so the two can be
compared within one run on one machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import zmq

LOOPBACK = "tcp://127.0.0.1:0"
LINGER = 1000


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _status_mb(field: str) -> float | None:
    """A memory figure of /proc/self/status (Linux), MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Peak resident memory of this process, MiB: VmHWM on Linux. Not ru_maxrss: Linux carries a parent's
    peak over fork and exec into it, so every actor reported the bench process's own peak (46.5 MiB, all alike)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def reset_peak() -> float | None:
    """Resident memory now, MiB, with the peak reset to it (Linux: clear_refs 5) so that `rss_mb` then tells
    the peak of what follows, not of the imports and set-up; None where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def body_of(size: int) -> Any:
    """100 B: a small msgpack map, as a service would send; larger: opaque bytes (which `raw` sends as they are,
    `raw-msgpack` msgpack-encoded, and zfabric in its envelope)."""
    if size <= 1024:
        return {"data": "x" * max(size - 12, 1)}
    return b"x" * size


# -- queue ------------------------------------------------------------------------------

def _identity(data: bytes) -> bytes:
    return data


RAW_QUEUES = ("raw", "raw-msgpack", "zf-codec")
"""The queue actors on plain pyzmq sockets: a bytes body as it is, msgpack-encoded as every other body, or
through zfabric's codec alone (its encode and decode, none of its classes: `benchmarks/codec_ceiling.py`)."""


def _curve_keys(keys: str) -> tuple[Any, Any]:
    """(server pair, client pair) from a keys directory, making both on first use."""
    from zfabric.security.keys import generate, load_pair

    if not os.path.exists(os.path.join(keys, "server.key_secret")):
        generate("server", keys)
        generate("client", keys)
    return load_pair(os.path.join(keys, "server.key_secret")), load_pair(os.path.join(keys, "client.key_secret"))


def queue_pull(impl: str, count: int, size: int = 100, slow_every: int = 0, keys: str = "") -> None:
    """Receive `count` messages; time from the first to the last. `slow_every`: sleep 1 ms every N messages.

    `raw-msgpack`: raw, with a bytes body msgpack-encoded too (issue 5's "no envelope, just msgpack"); plain
    `raw` passes a bytes body as it is; `zf-codec`: raw sockets with only zfabric's decode (a frame, then
    `decode_message`), no Consumer around it. With `keys` (a directory) the connection runs CURVE: raw sets the
    CURVE options by hand, zfabric uses `SocketOptions(curve=...)` with its authenticator and allowlist.
    """
    if impl in RAW_QUEUES:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, LINGER)
        if keys:
            server, _ = _curve_keys(keys)
            sock.curve_server = True
            sock.curve_secretkey = server.secret
            sock.curve_publickey = server.public
        sock.bind(LOOPBACK)
        emit(endpoint=sock.getsockopt_string(zmq.LAST_ENDPOINT))
        recv: Callable[[], Any] = sock.recv
        unpack: Callable[[Any], Any] = msgpack.unpackb if size <= 1024 or impl == "raw-msgpack" else _identity
        if impl == "zf-codec":
            from zfabric.codec import decode_message

            recv, unpack = partial(sock.recv, 0, False), decode_message
        unpack(recv())
        base = reset_peak()
        start = time.perf_counter()
        for n in range(count - 1):
            unpack(recv())
            if slow_every and n % slow_every == 0:
                time.sleep(0.001)
        elapsed = time.perf_counter() - start
        sock.close()
        ctx.term()
    elif impl == "zf-async":
        base = None
        elapsed = asyncio.run(_async_pull(count))
    else:
        from zfabric import Consumer, SocketOptions

        options = None
        if keys:
            from zfabric.security.curve import Curve
            from zfabric.security.zap import Allowlist

            server, _ = _curve_keys(keys)
            options = SocketOptions(curve=Curve(server, allow=Allowlist(keys)))
        with Consumer(LOOPBACK, options=options) as consumer:
            emit(endpoint=consumer.endpoint)
            receive = consumer.receive
            receive()
            base = reset_peak()
            start = time.perf_counter()
            for n in range(count - 1):
                receive()
                if slow_every and n % slow_every == 0:
                    time.sleep(0.001)
            elapsed = time.perf_counter() - start
    emit(result={"count": count - 1, "seconds": elapsed, "rss_mb": rss_mb(), "rss_start_mb": base})


async def _async_pull(count: int) -> float:
    """queue_pull through AsyncConsumer: seconds from the first message to the last."""
    from zfabric import AsyncConsumer

    async with AsyncConsumer(LOOPBACK) as consumer:
        emit(endpoint=consumer.endpoint)
        receive = consumer.receive
        await receive()
        start = time.perf_counter()
        for _ in range(count - 1):
            await receive()
        return time.perf_counter() - start


async def _async_push(endpoint: str, count: int, body: Any) -> None:
    from zfabric import AsyncProducer, SocketOptions

    async with AsyncProducer(endpoint, options=SocketOptions(linger_ms=60_000)) as producer:
        await producer.wait_for_consumers(1)
        send = producer.send
        for _ in range(count):
            await send(body)


def queue_push(impl: str, endpoint: str, count: int, size: int, batch: int = 0, keys: str = "") -> None:
    body = body_of(size)
    if impl == "zf-async":
        asyncio.run(_async_push(endpoint, count, body))
        emit(result={"rss_mb": rss_mb()})
        return
    if impl in RAW_QUEUES:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, -1)  # the benchmark must deliver everything before exiting
        if keys:
            server, client = _curve_keys(keys)
            sock.curve_serverkey = server.public
            sock.curve_secretkey = client.secret
            sock.curve_publickey = client.public
        sock.connect(endpoint)
        base = reset_peak()
        send, pack = sock.send, msgpack.packb
        if impl == "zf-codec":  # one frame a message, as Producer.send writes it (bodies under 16 KiB)
            from zfabric.codec import Stamp
            from zfabric.envelope import IdSource

            plain, now = Stamp(IdSource(), "").plain, time.time
            for _ in range(count):
                send(plain(body, now())[1])
        elif isinstance(body, bytes):
            copy = len(body) < 65536  # zero-copy for a large body, as zfabric's own frames of one
            if impl == "raw-msgpack":
                for _ in range(count):
                    send(pack(body), 0, copy=copy)  # type: ignore[call-overload]
            else:
                for _ in range(count):
                    send(body, 0, copy=copy)  # type: ignore[call-overload]
        else:
            for _ in range(count):
                send(pack(body))
        sock.close()
        ctx.term()
    else:
        from zfabric import Producer, SocketOptions

        options = SocketOptions(linger_ms=60_000)
        if keys:
            from zfabric.security.curve import Curve

            server, client = _curve_keys(keys)
            options = options.replace(curve=Curve(client, server_key=server.public))
        with Producer(endpoint, options=options) as producer:
            producer.wait_for_consumers(1)
            base = reset_peak()
            if batch:
                for i in range(0, count, batch):
                    producer.send_batch([body] * min(batch, count - i))
            else:
                send = producer.send
                for _ in range(count):
                    send(body)
    emit(result={"rss_mb": rss_mb(), "rss_start_mb": base})


# -- request-reply and scatter-gather -------------------------------------------------------

def echo_server(impl: str) -> None:
    """Answer every request with its body until killed."""
    if impl == "raw":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(LOOPBACK)
        emit(endpoint=sock.getsockopt_string(zmq.LAST_ENDPOINT))
        recv, send, pack, unpack = sock.recv_multipart, sock.send_multipart, msgpack.packb, msgpack.unpackb
        while True:
            route, payload = recv()
            send([route, pack(unpack(payload))])
    else:
        from zfabric import Replier

        replier = Replier(LOOPBACK, lambda env: env.body)
        emit(endpoint=replier.endpoint)
        replier.serve()


def rr_client(impl: str, endpoint: str, count: int, inflight: int, size: int, batch: int | None = None) -> None:
    """`count` requests, `inflight` at a time: round-trip times (inflight 1) or total time.

    `batch`: zfabric's `request_many(batch=...)` (None: its default, one batch per replier; 1: one request
    per ZeroMQ message, as raw sends them)."""
    body = body_of(size)
    rtts: list[float] = []
    if impl == "raw":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        send, recv, pack, unpack = sock.send, sock.recv, msgpack.packb, msgpack.unpackb
        send(pack(body))
        unpack(recv())
        clock = time.perf_counter
        start = clock()
        if inflight == 1:
            for _ in range(count):
                t = clock()
                send(pack(body))
                unpack(recv())
                rtts.append(clock() - t)
        else:
            for _ in range(count // inflight):
                for _ in range(inflight):
                    send(pack(body))
                for _ in range(inflight):
                    unpack(recv())
        elapsed = clock() - start
        sock.close()
        ctx.term()
    else:
        from zfabric import Requester

        with Requester(endpoint, timeout=10.0, retries=0) as requester:
            request = requester.request
            request(body)
            clock = time.perf_counter
            start = clock()
            if inflight == 1:
                for _ in range(count):
                    t = clock()
                    request(body)
                    rtts.append(clock() - t)
            else:
                many = requester.request_many
                for _ in range(count // inflight):
                    many([body] * inflight, batch=batch)
            elapsed = clock() - start
    emit(result={"count": count if inflight == 1 else count // inflight * inflight, "seconds": elapsed,
                 "rtts": rtts})


def sg_client(impl: str, endpoints: list[str], count: int, size: int) -> None:
    """`count` rounds of one request to every member, each round waiting for every reply."""
    body = body_of(size)
    rtts: list[float] = []
    clock = time.perf_counter
    if impl == "raw":
        ctx = zmq.Context()
        socks = []
        poller = zmq.Poller()
        for ep in endpoints:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            poller.register(s, zmq.POLLIN)
            socks.append(s)
        pack, unpack = msgpack.packb, msgpack.unpackb

        def round_trip() -> None:
            payload = pack(body)
            for s in socks:
                s.send(payload)
            left = len(socks)
            while left:
                for s, _ in poller.poll():
                    unpack(s.recv())
                    left -= 1

        round_trip()
        for _ in range(count):
            t = clock()
            round_trip()
            rtts.append(clock() - t)
        for s in socks:
            s.close()
        ctx.term()
    else:
        from zfabric import Scatterer

        with Scatterer({f"m{i}": ep for i, ep in enumerate(endpoints)}, deadline=10.0) as group:
            group.scatter(body)
            for _ in range(count):
                t = clock()
                group.scatter(body)
                rtts.append(clock() - t)
    emit(result={"count": count, "rtts": rtts})


# -- pub/sub ----------------------------------------------------------------------------------

TOPIC = "bench.t"


def ps_sub(impl: str, xpub: str, count: int) -> None:
    """Receive `count` messages of TOPIC after the publisher says go; gives up after 3 s of silence."""
    got = 0
    start = last = 0.0
    if impl == "raw":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(xpub)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        sock.recv_multipart()  # the first warm-up message: our subscription has reached the publisher
        emit(ready=True)
        while sock.recv_multipart()[1] == b"warm":
            pass  # the publisher sends these until the harness says go
        start = last = time.perf_counter()
        got = 1
        unpack, recv = msgpack.unpackb, sock.recv_multipart
        sock.setsockopt(zmq.RCVTIMEO, 3000)
        try:
            while got < count:
                topic, payload = recv()
                unpack(payload)
                got += 1
        except zmq.Again:
            pass
        last = time.perf_counter()
        sock.close()
        ctx.term()
    else:
        from zfabric import SocketOptions, Subscriber

        with Subscriber(xpub, topics=TOPIC, options=SocketOptions(receive_hwm=0)) as sub:
            sub.wait_ready(timeout=10)
            emit(ready=True)
            sub.receive(timeout=30)
            start = time.perf_counter()
            got = 1
            receive = sub.receive
            try:
                while got < count:
                    receive(timeout=3)
                    got += 1
            except TimeoutError:
                pass
            last = time.perf_counter()
    emit(result={"count": got - 1, "seconds": last - start})


def ps_pub(impl: str, xsub: str, count: int, size: int, subscribers: int) -> None:
    body = body_of(size)
    if impl == "raw":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, -1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(xsub)
        topic = TOPIC.encode()
        # Raw PUB cannot see subscribers: send warm-up messages until the harness says go.
        import select

        while not select.select([sys.stdin], [], [], 0.005)[0]:
            sock.send_multipart([topic, b"warm"])
        sys.stdin.readline()
        pack, send = msgpack.packb, sock.send
        more = zmq.SNDMORE
        for _ in range(count):
            send(topic, more)
            send(pack(body))
        sock.close()
        ctx.term()
    else:
        from zfabric import Publisher, SocketOptions

        with Publisher(xsub, options=SocketOptions(send_hwm=0, linger_ms=60_000)) as pub:
            pub.wait_for_subscribers(subscribers, TOPIC, timeout=20)
            sys.stdin.readline()
            publish = pub.publish
            for _ in range(count):
                publish(TOPIC, body)
    emit(result={})


# -- reliable queue -----------------------------------------------------------------------------

def rel_worker(endpoint: str) -> None:
    """A worker with the default window that acknowledges every message."""
    from zfabric import Worker

    worker = Worker(endpoint, "bench", lambda env: None)
    emit(ready=True)
    worker.run()


def rel_producer(endpoint: str, count: int, size: int) -> None:
    """Send `count` messages to a reliable queue (default window and batch size); time until every one is
    confirmed durable, and until the workers have acknowledged every one (the sidecar's `acked` counter)."""
    from zfabric import ReliableProducer
    from zfabric.sidecar.client import SidecarClient

    body = body_of(size)
    warmup = 500
    with ReliableProducer(endpoint, "bench", timeout=60) as producer, SidecarClient(endpoint) as control:
        producer.send_many([body] * warmup)
        start = time.perf_counter()
        for i in range(0, count, 10_000):
            producer.send_many([body] * min(10_000, count - i))
        elapsed = time.perf_counter() - start
        while control.stats()["counters"]["acked"] < warmup + count:
            time.sleep(0.01)
        processed = time.perf_counter() - start
    emit(result={"count": count, "seconds": elapsed, "processed_seconds": processed, "rss_mb": rss_mb()})


ROLES = {f.__name__.replace("_", "-"): f for f in (queue_pull, queue_push, echo_server, rr_client, sg_client, ps_sub, ps_pub,
                                                    rel_worker, rel_producer)}

MAX_LIFETIME = 900
"""Seconds after which an actor ends itself, whatever it waits for: a benchmark never leaves a process behind."""

if __name__ == "__main__":
    import signal

    signal.alarm(MAX_LIFETIME)
    ROLES[sys.argv[1]](**json.loads(sys.argv[2]))
