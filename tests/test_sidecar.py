"""The sidecar in-process (its thread launcher): both faces, handler signals, bad input, paging, restarts, config."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from zfabric import codec
from zfabric.envelope import Envelope
from zfabric.errors import (
    ConfigError,
    DoNotRetry,
    EncodeError,
    Rejected,
    RetryAfter,
    StoreError,
)
from zfabric.patterns.reliable import AsyncReliableProducer, ReliableProducer
from zfabric.patterns.worker import AsyncWorker, Worker
from zfabric.sidecar import protocol as p
from zfabric.sidecar.client import OfflineDeadLetters, SidecarClient
from zfabric.sidecar.config import SidecarConfig
from zfabric.sidecar.policy import RetryPolicy
from zfabric.sidecar.service import Sidecar
from zfabric.sidecar.store import DeadLetterFilter

from .conftest import free_tcp_ports, wait_until

FAST = RetryPolicy(max_attempts=3, backoff_base=0.01, backoff_cap=0.05)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Sidecar]:
    sc = Sidecar(tmp_path / "s.db", {"orders": FAST, "mail": RetryPolicy()}, endpoint="tcp://127.0.0.1:0",
                 lease_timeout=2.0).start()
    yield sc
    sc.stop()


class Recorder:
    """A handler that records what it saw and fails as told: {n: exception to raise on every attempt}."""

    def __init__(self, fail: dict[int, BaseException] | None = None) -> None:
        self.seen: list[tuple[int, int, float]] = []
        self.fail = fail or {}
        self.lock = threading.Lock()

    def __call__(self, env: Envelope) -> None:
        with self.lock:
            self.seen.append((env.body["n"], env.attempt, time.monotonic()))
        exc = self.fail.get(env.body["n"])
        if exc is not None:
            raise exc

    def count(self, n: int) -> int:
        return sum(1 for s in self.seen if s[0] == n)


def run_worker(sc: Sidecar, handler: Recorder, **kw: object) -> Worker:
    return Worker(sc.endpoint, "orders", handler, heartbeat=0.3, **kw).start()  # type: ignore[arg-type]


def test_handler_signals_decide_the_fate_of_a_message(sidecar: Sidecar) -> None:
    """Return: ack. Raise: retried up to max attempts. RetryAfter: retried after that delay. DoNotRetry or a
    `no_retry` type: dead-lettered at once."""
    handler = Recorder({1: ValueError("flaky forever"), 2: RetryAfter(0.3), 3: DoNotRetry("bad data"), 4: KeyError("no such sku")})
    worker = run_worker(sidecar, handler, no_retry=(KeyError,))
    try:
        with ReliableProducer(sidecar.endpoint, "orders") as producer:
            producer.send_many({"n": n} for n in range(5))
        assert wait_until(lambda: sidecar.stats.dead_lettered == 4, timeout=20)
    finally:
        worker.close()
    assert handler.count(0) == 1
    assert handler.count(1) == 3, "retried until max_attempts"
    assert handler.count(2) == 3
    tries = [t for n, _, t in handler.seen if n == 2]
    assert tries[1] - tries[0] >= 0.25, "RetryAfter's delay replaces the policy's backoff"
    assert handler.count(3) == 1 and handler.count(4) == 1, "not retried"
    with SidecarClient(sidecar.endpoint) as client:
        reasons = {r.envelope.body["n"]: (r.reason, r.error_type) for r in client.dead_letters(history=True)}  # type: ignore[union-attr]
    assert reasons == {1: ("max-attempts", "ValueError"), 2: ("max-attempts", "RetryAfter"),
                       3: ("not-retryable", "DoNotRetry"), 4: ("not-retryable", "KeyError")}


def test_asyncio_producer_and_worker(sidecar: Sidecar) -> None:
    """Many coroutines send at once (their messages share batches); an async handler fails one message."""
    seen: list[int] = []

    async def handler(env: Envelope) -> None:
        await asyncio.sleep(0)
        seen.append(env.body["n"])
        if env.body["n"] == 7:
            raise ValueError("seven")

    async def main() -> None:
        producer = AsyncReliableProducer(sidecar.endpoint, "orders")
        worker = AsyncWorker(sidecar.endpoint, "orders", handler, heartbeat=0.3)
        task = asyncio.create_task(worker.run())
        try:
            envs = await asyncio.gather(*(producer.send({"n": n}) for n in range(300)))
            assert len({e.id for e in envs}) == 300
            more = await producer.send_many({"n": n} for n in range(300, 1300))
            assert len(more) == 1000
            while sidecar.stats.acked < 1299 or sidecar.stats.dead_lettered < 1:
                await asyncio.sleep(0.02)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 5)
            worker.close(0)
            producer.close(0)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert sorted(set(seen)) == list(range(1300))
    assert seen.count(7) == 3
    assert producer_stats_ok(sidecar)


def producer_stats_ok(sc: Sidecar) -> bool:
    s = sc.stats
    return s.received == s.confirmed == 1300 and s.duplicates == 0


def test_async_worker_runs_sync_handlers_off_the_loop(sidecar: Sidecar) -> None:
    """A slow sync handler runs in the thread pool, so heartbeats go on and the lease holds."""
    seen: list[int] = []

    def slow(env: Envelope) -> None:
        time.sleep(2.5)  # longer than the lease timeout (2 s)
        seen.append(env.body["n"])

    async def main() -> None:
        worker = AsyncWorker(sidecar.endpoint, "orders", slow, heartbeat=0.3)
        with ReliableProducer(sidecar.endpoint, "orders") as producer:
            producer.send({"n": 1})
        await asyncio.wait_for(worker.run(max_messages=1), 20)
        await asyncio.sleep(0.3)
        worker.close(200)

    asyncio.run(main())
    assert seen == [1]
    assert wait_until(lambda: sidecar.stats.acked == 1)
    assert sidecar.stats.leases_expired == 0 and sidecar.stats.redelivered == 0


def test_sync_worker_keeps_its_lease_through_a_long_handler(sidecar: Sidecar) -> None:
    handler = Recorder()
    slow = lambda env: (time.sleep(2.5), handler(env))  # noqa: E731
    worker = Worker(sidecar.endpoint, "orders", slow, heartbeat=0.3).start(max_messages=1)
    try:
        with ReliableProducer(sidecar.endpoint, "orders") as producer:
            producer.send({"n": 1})
        assert wait_until(lambda: sidecar.stats.acked == 1, timeout=20)
    finally:
        worker.close()
    assert sidecar.stats.leases_expired == 0 and handler.count(1) == 1


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_unknown_queue_is_rejected_with_a_clear_error(sidecar: Sidecar, face: str) -> None:
    if face == "sync":
        with ReliableProducer(sidecar.endpoint, "invoices") as producer, pytest.raises(Rejected) as info:
            producer.send({"n": 1})
    else:
        async def main() -> None:
            producer = AsyncReliableProducer(sidecar.endpoint, "invoices")
            try:
                await producer.send({"n": 1})
            finally:
                producer.close(0)
        with pytest.raises(Rejected) as info:
            asyncio.run(asyncio.wait_for(main(), 20))
    assert "'invoices' is not served" in str(info.value) and "orders" in str(info.value)
    assert sidecar.stats.rejected == 1


def test_worker_for_an_unknown_queue_fails_loudly(sidecar: Sidecar) -> None:
    worker = Worker(sidecar.endpoint, "invoices", Recorder())
    try:
        with pytest.raises(ConfigError, match="does not serve queue 'invoices'"):
            worker.run()
    finally:
        worker.close(0)


def test_resends_are_deduplicated(sidecar: Sidecar) -> None:
    handler = Recorder()
    worker = run_worker(sidecar, handler)
    try:
        with ReliableProducer(sidecar.endpoint, "orders") as producer:
            env = producer.envelope({"n": 1})
            producer.send_envelopes([env])
            producer.send_envelopes([env])
            producer.send_envelopes([env, env])
            producer.send({"n": 2})
        assert wait_until(lambda: sidecar.stats.acked == 2)
    finally:
        worker.close()
    assert sidecar.stats.duplicates == 2 and sidecar.stats.received == 2
    assert handler.count(1) == 1


@pytest.mark.parametrize("asyncio_face", [False, True], ids=["sync", "async"])
def test_a_send_before_the_connection_is_up_is_sent_once_not_resent(sidecar: Sidecar, asyncio_face: bool) -> None:
    """A fresh producer's first batch may find no connection yet; it must go out when the connection is up
    (counted once as sent), not be counted sent, lost to EAGAIN and resent a second later."""
    if asyncio_face:
        async def main() -> AsyncReliableProducer:
            async with AsyncReliableProducer(sidecar.endpoint, "mail", resend_after=30) as producer:
                await producer.send_many(range(50), timeout=10)
                return producer
        stats = asyncio.run(main()).stats
    else:
        with ReliableProducer(sidecar.endpoint, "mail", resend_after=30) as producer:
            producer.send_many(range(50), timeout=10)
        stats = producer.stats
    assert (stats.sent, stats.resent, stats.confirmed) == (50, 0, 50)
    assert sidecar.stats.received == 50 and sidecar.stats.duplicates == 0


def test_hostile_frames_are_counted_and_skipped(sidecar: Sidecar, ctx: zmq.Context) -> None:
    """Garbage from a raw socket never stops the sidecar: valid messages around it are confirmed and delivered."""
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(sidecar.endpoint)
    junk = [[b"PUT"], [b"PUT", b"\xc1", b"x"], [b"PUT", b"h"], [b"PUT", b"\x92\xc4\x01h\x01"], [b"PUT", b"\x91\xc4\x01h"],
            [b"PUT", b"\x90"], [b"PUT", b"\x92\xc4\x01h\xc4\x01b"], [b"NOPE", b"x"], [b"ACK", b"\xc1"],
            [b"NAK", b"\x81\xa1a\x01"], [b"RDY", b"\x90"], [b"HB"], [b"CTL", b"\xd4\x01\x00"], [b"\x00" * 100], [b""]]
    handler = Recorder()
    worker = run_worker(sidecar, handler)
    try:
        with ReliableProducer(sidecar.endpoint, "orders") as producer:
            for i, frames in enumerate(junk):
                raw.send_multipart(frames)
                producer.send({"n": i})
        assert wait_until(lambda: sidecar.stats.acked == len(junk))
    finally:
        worker.close()
        raw.close(0)
    assert sidecar.stats.decode_errors >= len(junk) - 1
    assert sorted(n for n, _, _ in handler.seen) == list(range(len(junk)))


def test_backlog_larger_than_memory_is_paged_in_order(tmp_path: Path) -> None:
    """With room for 10 ready messages in memory, 500 queued ones still arrive, each once and in order."""
    sc = Sidecar(tmp_path / "s.db", {"orders": FAST}, endpoint="tcp://127.0.0.1:0", cache_limit=10).start()
    handler = Recorder()
    try:
        with ReliableProducer(sc.endpoint, "orders") as producer:
            producer.send_many({"n": n} for n in range(500))
        worker = Worker(sc.endpoint, "orders", handler, window=1).start()
        assert wait_until(lambda: sc.stats.acked == 500, timeout=30)
        worker.close()
    finally:
        sc.stop()
    assert [n for n, _, _ in handler.seen] == list(range(500))


def test_restart_recovers_ready_delayed_and_in_flight_messages(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    slow = RetryPolicy(max_attempts=5, backoff_base=0.5, backoff_cap=0.5, jitter=0)
    sc = Sidecar(store, {"orders": slow}, endpoint="tcp://127.0.0.1:0").start()
    handler = Recorder({0: ValueError("once")})
    with ReliableProducer(sc.endpoint, "orders") as producer:
        producer.send_many({"n": n} for n in range(50))
    worker = Worker(sc.endpoint, "orders", handler).start(max_messages=1)
    assert wait_until(lambda: sc.stats.nacked == 1)
    worker.close()
    sc.stop()
    handler.fail.clear()
    sc = Sidecar(store, {"orders": slow}, endpoint="tcp://127.0.0.1:0").start()
    worker = Worker(sc.endpoint, "orders", handler).start()
    try:
        assert wait_until(lambda: sc.stats.acked == 50, timeout=20)
    finally:
        worker.close()
        sc.stop()
    assert sorted({n for n, _, _ in handler.seen}) == list(range(50))
    first, second = [a for n, a, _ in handler.seen if n == 0]
    assert first == 1 and second >= 2, "the failed attempt is remembered across the restart"


def test_one_sidecar_per_store(tmp_path: Path, sidecar: Sidecar) -> None:
    second = Sidecar(sidecar.config.store, ["orders"], endpoint="tcp://127.0.0.1:0")
    with pytest.raises(StoreError, match="in use by pid"):
        second.start()
    with OfflineDeadLetters(sidecar.config.store) as offline:
        assert offline.count() == 0
        with pytest.raises(StoreError, match="--endpoint"):
            offline.replay(DeadLetterFilter())


def test_offline_replay_waits_for_the_next_start(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    sc = Sidecar(store, {"orders": RetryPolicy(max_attempts=1)}, endpoint="tcp://127.0.0.1:0").start()
    handler = Recorder({1: ValueError("bug")})
    worker = run_worker(sc, handler)
    with ReliableProducer(sc.endpoint, "orders") as producer:
        producer.send_many({"n": n} for n in range(3))
    assert wait_until(lambda: sc.stats.dead_lettered == 1 and sc.stats.acked == 2)
    worker.close()
    sc.stop()
    with OfflineDeadLetters(store) as offline:
        [record] = offline.dead_letters()
        assert offline.replay(DeadLetterFilter(queue="orders"))["replayed"] == 1
        assert offline.count() == 0
    handler.fail.clear()
    sc = Sidecar(store, {"orders": RetryPolicy(max_attempts=1)}, endpoint="tcp://127.0.0.1:0").start()
    worker = run_worker(sc, handler)
    try:
        assert wait_until(lambda: sc.stats.acked == 1)
    finally:
        worker.close()
        sc.stop()
    assert handler.count(1) == 2


def test_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "sidecar.yaml"
    cfg_file.write_text("store: orders.db\nlease_timeout: 4\nqueues:\n  orders: {max_attempts: 7, ttl: 60}\n  mail:\n")
    cfg = SidecarConfig.from_file(cfg_file)
    assert cfg.store == tmp_path / "orders.db"
    assert cfg.queues["orders"] == RetryPolicy(max_attempts=7, ttl=60)
    assert cfg.queues["mail"] == RetryPolicy()
    assert cfg.lease_timeout == 4


@pytest.mark.parametrize("text, message", [
    ("store: a.db\nqueues: {orders: {max_attemps: 3}}\n", "queues.orders.max_attemps: unknown key; did you mean 'max_attempts'?"),
    ("store: a.db\nqueues: {orders: {max_attempts: five}}\n", "max_attempts: expected a positive integer, got 'five'"),
    ("store: a.db\nlease_timout: 3\nqueues: [orders]\n", "lease_timout: unknown key; did you mean 'lease_timeout'?"),
    ("store: a.db\nqueues: []\n", "declare at least one queue"),
    ("queues: [orders]\n", "missing key 'store'"),
    ("a: &x [1]\nb: *x\n", "aliases are not allowed"),
    ("store: [\n", "invalid YAML"),
])
def test_bad_config_files_say_what_and_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        SidecarConfig.from_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_both_put_layouts_are_stored_and_deliveries_come_packed(sidecar: Sidecar, ctx: zmq.Context) -> None:
    """A PUT packs its header/body pairs in one frame; the older layout (a frame each) is still accepted.
    Deliveries go out as one DLV frame of (attempt, header, body) triples to a worker that says it reads
    them, and in the older layout to one that does not."""
    from zfabric import codec
    from zfabric.envelope import IdSource, Kind
    from zfabric.sidecar import protocol as p

    ids = IdSource()
    envs = [Envelope(ids.next(), Kind.MESSAGE, "orders", {"n": n}, created_at=time.time()) for n in range(6)]
    parts = [bytes(f) for env in envs for f in codec.encode_split(env)]
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(sidecar.endpoint)
    try:
        raw.send_multipart([p.PUT, p.pack(parts[:6])])  # three messages, packed
        raw.send_multipart([p.PUT, *parts[6:]])  # three more, a frame each
        confirmed: list[bytes] = []
        while len(confirmed) < 6:
            assert raw.poll(5000, zmq.POLLIN), f"{len(confirmed)} of 6 confirmed"
            cmd, arg = raw.recv_multipart()
            assert cmd == p.CONFIRM
            confirmed += p.unpack(arg, "OK")
        assert sorted(confirmed) == sorted(e.id for e in envs)
        older = ctx.socket(zmq.DEALER)  # a worker of the first release: no "dlv" in its RDY
        older.setsockopt(zmq.LINGER, 0)
        older.connect(sidecar.endpoint)
        older.send_multipart([p.READY, p.pack({"worker": b"o" * 8, "queue": "orders", "window": 3})])
        assert wait_until(lambda: sidecar.stats.workers == 1)
        raw.send_multipart([p.READY, p.pack({"worker": b"w" * 8, "queue": "orders", "window": 3, "dlv": "packed"})])
        got: list[tuple[int, bytes, bytes]] = []
        for sock, packed in ((older, False), (raw, True)):
            while len(got) < (3 if sock is older else 6):
                assert sock.poll(5000, zmq.POLLIN), f"{len(got)} of 6 delivered"
                cmd, *rest = sock.recv_multipart()
                assert cmd == p.DELIVER and (len(rest) == 1) == packed
                got += p.split_deliveries(rest)
        older.close(0)
        assert sorted(codec.decode([h, b]).body["n"] for _, h, b in got) == list(range(6))
        assert {a for a, _, _ in got} == {1}
    finally:
        raw.close(0)


def test_both_dlv_layouts_parse_and_hostile_ones_are_refused() -> None:
    from zfabric.errors import DecodeError
    from zfabric.sidecar import protocol as p

    packed = p.pack([1, b"h1", b"b1", 3, b"h2", b"b2"])
    older = [(1).to_bytes(4, "big"), b"h1", b"b1", (3).to_bytes(4, "big"), b"h2", b"b2"]
    assert p.split_deliveries([packed]) == p.split_deliveries(older) == [(1, b"h1", b"b1"), (3, b"h2", b"b2")]
    for bad in ([1, b"h"], [0, b"h", b"b"], ["1", b"h", b"b"], [1, "h", b"b"], [], {"a": 1}, 7):
        with pytest.raises(DecodeError, match="DLV"):
            p.split_deliveries([p.pack(bad)])
    with pytest.raises(DecodeError, match="DLV"):
        p.split_deliveries([b"\xc1"])


def test_put_batches_stay_under_the_frame_budget() -> None:
    """However large the messages, a PUT frame holds about BATCH_BYTES of them (at least one), far below
    the 64 MiB a socket accepts in one frame."""
    from zfabric import codec
    from zfabric.envelope import IdSource, Kind
    from zfabric.patterns.reliable import ConfirmFlow
    from zfabric.sidecar import protocol as p

    flow = ConfirmFlow(resend_after=1.0)
    ids = IdSource()
    for _ in range(10):
        env = Envelope(ids.next(), Kind.MESSAGE, "q", b"x" * (3 << 20), created_at=1.0)
        flow.add(env, codec.encode_split(env), 10.0)
    sizes = []
    while True:
        frames, first, _ = flow.batch(1.0, 100)
        if not frames:
            break
        assert frames[0] == p.PUT and len(frames) == 2
        sizes.append(first)
        assert len(frames[1]) < 8 << 20
    assert sizes == [2, 2, 2, 2, 2]


def test_a_message_sent_twice_in_one_pass_is_stored_once(tmp_path: Path, ctx: zmq.Context) -> None:
    """Two PUTs of the same message that the sidecar reads in one pass (a resend that caught up with the original):
    one is stored, the other is a duplicate, and both are confirmed. (The second INSERT of the same id stopped
    the sidecar before: the first was not written yet when the second was checked.)"""
    [port] = free_tcp_ports(1)
    env = Envelope.new({"n": 1}, topic="orders")
    put = [p.PUT, p.pack(list(codec.encode_split(env)))]
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"tcp://127.0.0.1:{port}")
    raw.send_multipart(put)  # queued until the sidecar binds: both arrive together
    raw.send_multipart(put)
    sc = Sidecar(tmp_path / "s.db", {"orders": FAST}, endpoint=f"tcp://127.0.0.1:{port}").start()
    try:
        confirmed = []
        while len(confirmed) < 2 and raw.poll(5000):
            cmd, ids = raw.recv_multipart()
            assert cmd == p.CONFIRM
            confirmed += p.unpack(ids, "OK")
        assert confirmed == [env.id, env.id]
        assert (sc.stats.received, sc.stats.duplicates) == (1, 1)
        assert sc._thread is not None and sc._thread.is_alive(), "the sidecar kept running"
    finally:
        raw.close(0)
        sc.stop()


@pytest.mark.parametrize("face", ["sync", "asyncio"])
def test_an_unencodable_body_fails_the_call_before_anything_is_sent(face: str, sidecar: Sidecar) -> None:
    """send_many with one body msgpack cannot encode raises EncodeError naming its type, and sends none of the
    call's messages (the asyncio face sent those ahead of it before, and left them unawaited); the producer stays
    usable."""
    bodies = [{"n": 1}, {"n": 2}, object(), {"n": 4}]
    if face == "sync":
        with ReliableProducer(sidecar.endpoint, "orders") as producer:
            with pytest.raises(EncodeError, match="object"):
                producer.send_many(bodies)
            producer.send({"n": 5}, timeout=10)
    else:
        async def main() -> None:
            async with AsyncReliableProducer(sidecar.endpoint, "orders") as producer:
                with pytest.raises(EncodeError, match="object"):
                    await producer.send_many(bodies)
                await producer.send({"n": 5}, timeout=10)
        asyncio.run(asyncio.wait_for(main(), 20))
    assert (sidecar.stats.received, sidecar.stats.confirmed) == (1, 1)


def test_a_replay_while_messages_are_handed_out_delivers_each_once(tmp_path: Path, ctx: zmq.Context) -> None:
    """A replay moves the sidecar's paging back to the dead letter's place in the queue. When a worker's credit
    arrives in the same pass, the messages that pass handed out were still ready in the store and were paged in
    again: each went out twice, both times as attempt 1. (With batch rows it could also stop the sidecar.)"""
    sc = Sidecar(tmp_path / "s.db", {"orders": RetryPolicy(max_attempts=1)}, endpoint="tcp://127.0.0.1:0",
                 lease_timeout=10.0).start()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        handler = Recorder({0: ValueError("dead on arrival")})
        worker = run_worker(sc, handler)
        with ReliableProducer(sc.endpoint, "orders") as producer:
            producer.send({"n": 0})
            assert wait_until(lambda: sc.stats.dead_lettered == 1)
            worker.close()
            assert wait_until(lambda: sc.stats.workers == 0 or not sc.ledger.leases)
            producer.send_many({"n": n} for n in range(1, 51))  # ready in memory, behind the dead letter
        me = b"raw-worker-00001"
        raw.connect(sc.endpoint)
        raw.send_multipart([p.READY, p.pack({"worker": me, "name": "raw", "queue": "orders", "window": 10,
                                              "dlv": p.DLV_PACKED})])
        raw.send_multipart([p.CONTROL, p.pack({"op": "dlq.replay", "filter": {}})])  # read in the same pass
        seen: list[tuple[bytes, int]] = []
        replayed = None
        while (replayed is None or len({i for i, _ in seen}) < 51) and raw.poll(3000):
            frames = raw.recv_multipart()
            if frames[0] == p.CONTROL_REPLY:
                replayed = p.unpack(frames[1], "CTR")["replayed"]
            elif frames[0] == p.DELIVER:
                items = p.unpack(frames[1], "DLV")
                got = [(codec.decode_header(items[i + 1]).id, items[i]) for i in range(0, len(items), 3)]
                seen += got
                raw.send_multipart([p.ACK, p.pack({"worker": me, "acks": [[i, a] for i, a in got]})])
        assert replayed == 1
        assert len({i for i, _ in seen}) == 51, "every message, the replayed one included, is delivered"
        assert len(seen) == 51, f"{len(seen) - len(set(seen))} message(s) delivered twice"
        assert sc._thread is not None and sc._thread.is_alive()
    finally:
        raw.close(0)
        sc.stop()
