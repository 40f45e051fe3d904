"""A producer's backlog: small messages taken in while every consumer's queue is full, sent as batches.

A consumer that falls behind spends its time receiving ZeroMQ messages one by one: about 2 us each in
Python, against about 0.9 us per message of a batch. So once `Producer.send` finds every consumer's queue
full, it keeps taking small messages into this bounded backlog and returns, and a flusher thread sends
them, up to BACKLOG_BATCH to a ZeroMQ message, as soon as the socket takes more. Consumers receive the
same messages in the same order; only the framing differs. A producer that keeps up never uses it: each
message goes out at once, on its own, as before. (NATS clients keep a pending buffer that a flusher
writes out in the same way; here it only fills under back-pressure.)

While the backlog holds anything, the flusher owns the socket and every new message joins the backlog
behind it, so order is kept; once the backlog is empty and the flusher asleep, the socket is the
producer's again. The producer's thread adds small messages without taking a lock (a lock taken on
every send cost a sixth of the producer's rate under back-pressure): only it appends, only the
flusher takes out, and each looks at the other's flag after its own step, so one of the two always
sees the other (see `Backlog`).

`Backlog` serves the sync `Producer` with a thread; `AsyncBacklog` serves `AsyncProducer` with a task on
its event loop, with the same bounds and the same batches (`batch_end`, `batch_frames`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from .. import codec
from .._socket import send_frames, wait_ms

log = logging.getLogger("zfabric.queue")

BACKLOG_MAX = 1000
"""Messages a producer's backlog holds at most by default (besides those being sent); send waits beyond.
`Producer(backlog=N)` sets another bound; 0 turns the backlog off."""
BACKLOG_MAX_BYTES = 1 << 20
"""Bytes of messages larger than BACKLOG_SMALL a producer's backlog holds at most (one is always taken); the
small ones are bounded by their count, BACKLOG_MAX * BACKLOG_SMALL at most."""
BACKLOG_BATCH = 16
"""Messages per batch the flusher sends at most. A batch is one ZeroMQ message, which the high-water
marks count as one: under back-pressure they bound batches, not messages. 16 rather than 64: the
same throughput within noise, and a consumer that stops reading holds 27,000-40,000 small messages
rather than 62,000-66,000, as many as under raw pyzmq PUSH (benchmarks/stuck_consumer.py)."""
BACKLOG_BATCH_BYTES = 8192
"""Bytes per batch the flusher sends, about, at most: what the high-water marks hold stays bounded."""
BACKLOG_SMALL = 1024
"""Only a one-frame message up to this size starts a backlog: batching larger ones saves little and
copies their bodies (a larger message that comes while a backlog exists joins it, to keep order, and
goes alone, uncopied)."""
_POLL_MS = 50
"""How long the flusher waits for room at a time, so that close() is noticed."""
_NOBLOCK = int(zmq.NOBLOCK)
_POLLOUT = int(zmq.POLLOUT)


def is_small(item: Any) -> bool:
    """True for a message the backlog may batch: one frame (bytes) of at most BACKLOG_SMALL."""
    return type(item) is bytes and len(item) <= BACKLOG_SMALL


def even_share(items: Sequence[bytes]) -> int:
    """Messages per batch when every one of `items` is small: about BACKLOG_BATCH_BYTES by their average size."""
    return max(1, min(BACKLOG_BATCH, BACKLOG_BATCH_BYTES * len(items) // max(1, sum(map(len, items)))))


def batch_end(items: Sequence[Any], i: int, n: int, per: int | None) -> int:
    """Where the ZeroMQ message that starts with `items[i]` ends (exclusive, at most `n`): `per` items when all
    are known to be small, else the small neighbours up to BACKLOG_BATCH and BACKLOG_BATCH_BYTES, and a message
    that is not small alone."""
    if per is not None:
        return min(n, i + per)
    j, size = i, 0
    while j < n and j - i < BACKLOG_BATCH and size < BACKLOG_BATCH_BYTES:
        item = items[j]
        if not is_small(item):
            break
        size += len(item)
        j += 1
    return max(j, i + 1)


def batch_frames(items: Sequence[Any], i: int, j: int) -> list[Any]:
    """The frames of the ZeroMQ message that carries `items[i:j]`: a batch of several, or one as it is."""
    if j - i > 1:
        return codec.join_batch(items[i:j])
    item = items[i]
    return [item] if type(item) is bytes else item


def size_of(item: Any) -> int:
    """Bytes of a message as the backlog keeps it: one frame, or a list of frames."""
    return len(item) if type(item) is bytes else sum(map(len, item))


class Backlog:
    """Messages accepted but not yet handed to the socket, and the thread that sends them.

    The owner (the producer's thread) sends through the socket itself only while `active` is False: nothing
    waits here and the flusher sleeps, so everything taken in went out and the socket is the owner's again.
    Otherwise it adds its message behind the others: a small one with `take`, without the lock, anything else
    with `put`, holding `lock`. The flusher takes out everything waiting at once and sends it; only it removes
    and only the owner appends, so `take` needs no lock. Each message is kept as its one frame (bytes), or as
    its list of frames.
    """

    def __init__(self, sock: zmq.Socket[Any], who: str, stats: Any) -> None:
        self.lock = threading.Lock()
        self.limit = BACKLOG_MAX
        """Messages held at most (the owner may set another bound); 0: the owner never uses this backlog."""
        self._changed = threading.Condition(self.lock)
        self._sock = sock
        self._who = who
        self._stats = stats
        self.waiting: deque[Any] = deque()
        """Messages taken in, not yet taken out by the flusher, oldest first."""
        self.idle = True
        """False while the flusher has work, or has been woken for it: it may hold messages taken out of
        `waiting` and not yet sent. Set holding `lock`; the owner reads it without."""
        self._bytes = 0  # of the messages in `waiting` that are not small (changed holding `lock`)
        self._mixed = False  # `waiting` holds a message that is not small (and not to be batched)
        self._wanted = False  # someone waits for room or for the end: the flusher wakes them (set holding `lock`)
        self._give_up_at: float | None = None  # set by close(): the flusher drops what it could not send by then
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True while any message waits here or is being sent: the flusher owns the socket."""
        return bool(self.waiting) or not self.idle

    def take(self, message: bytes) -> bool:
        """Add a small one-frame message behind an active backlog if there is room now (the owner, no lock: only
        the flusher removes, so the room seen cannot shrink). (Not counted in bytes: `limit` of them hold at
        most `limit` * BACKLOG_SMALL.)"""
        waiting = self.waiting
        if len(waiting) < self.limit and len(message) <= BACKLOG_SMALL:
            waiting.append(message)
            if self.idle:  # the flusher went to sleep before this message came, or is about to: wake it
                with self.lock:
                    self._wake()
            return True
        return False

    def put(self, frames: list[Any], timeout: float | None) -> bool:
        """Add a message (holding `lock`), waiting at most `timeout` s (None: forever) for room;
        False if there was none in time, and the message was not taken."""
        size = len(frames[0]) if len(frames) == 1 else sum(map(len, frames))
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = self.waiting
        while waiting and (len(waiting) >= self.limit or self._bytes + size > BACKLOG_MAX_BYTES):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._wanted = True
            self._changed.wait(left)
        if len(frames) == 1 and size <= BACKLOG_SMALL:
            waiting.append(frames[0])
        else:
            waiting.append(frames[0] if len(frames) == 1 else frames)
            self._bytes += size
            self._mixed = True
        if self._thread is None:
            self.idle = False
            self._thread = threading.Thread(target=self._run, name=f"zfabric-backlog-{self._who}", daemon=True)
            self._thread.start()
        else:
            self._wake()
        return True

    def _wake(self) -> None:
        """Wake the flusher (holding `lock`), once: until it runs, later messages need not wake it again."""
        if self.idle:
            self.idle = False
            self._changed.notify_all()

    def _run(self) -> None:
        waiting, popleft = self.waiting, self.waiting.popleft
        while True:
            with self.lock:
                while not waiting:
                    # `idle` is set before `waiting` is looked at again, on every turn (a wake-up may find nothing
                    # new: one that was due to a message taken out since): `take` appends, then reads `idle`.
                    self.idle = True
                    if waiting:
                        break
                    self._changed.notify_all()  # close() waits for this
                    if self._give_up_at is not None:
                        return
                    self._changed.wait()
                self.idle = False
                items = [popleft() for _ in range(len(waiting))]  # the owner may append meanwhile: those stay
                mixed, self._bytes, self._mixed = self._mixed, 0, False
                if self._wanted:
                    self._wanted = False
                    self._changed.notify_all()  # room for senders
            self._stats.backlogged += len(items)
            unsent = 0
            try:
                unsent = self._send_all(items, mixed)
            except zmq.ZMQError as exc:  # the socket failed under it (a context terminated): nothing more goes
                unsent = len(items)
                log.error("%s: sending its backlog failed: %s", self._who, exc)
            if unsent:
                with self.lock:
                    self._stats.backlog_dropped += unsent
                    self._drop_waiting()

    def _send_all(self, items: list[Any], mixed: bool) -> int:
        """Send `items` in order, small neighbours batched; how many were left unsent when close() gave up.
        `mixed`: some item is not small (checked one by one); else each batch takes an even share."""
        sock, stats = self._sock, self._stats
        i, n = 0, len(items)
        per = None if mixed else even_share(items)
        while i < n:
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                return n - i  # close() is waiting for this thread, past the linger
            j = batch_end(items, i, n, per)
            frames = batch_frames(items, i, j)
            while True:
                try:
                    send_frames(sock, frames, _NOBLOCK)
                    break
                except zmq.Again:
                    if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                        return n - i
                    zmq.zmq_poll([(sock, _POLLOUT)], _POLL_MS)
            stats.batches_sent += j - i > 1
            i = j
        return 0

    def close(self, timeout: float | None) -> int:
        """Wait at most `timeout` s (None: forever) until everything taken in was handed to the socket, then stop
        the flusher; how many messages were dropped because the time ran out (counted; the owner says so)."""
        thread = self._thread
        if thread is None:
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            dropped_before = self._stats.backlog_dropped
            self._give_up_at = math.inf if deadline is None else deadline
            self._changed.notify_all()
            while self.active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(left)
        thread.join(5)  # past the deadline it stops within one send or poll (_POLL_MS)
        if thread.is_alive():  # not seen: it would have to hang inside one non-blocking send
            log.error("%s: its backlog thread did not stop within 5 s of the linger", self._who)
        with self.lock:
            self._drop_waiting()  # the flusher stopped (or never got to them): they are dropped
            return int(self._stats.backlog_dropped - dropped_before)

    def _drop_waiting(self) -> None:
        """Drop what waits, counted (holding `lock`): one by one, so a message the owner adds meanwhile is either
        counted here or left for the flusher, never lost uncounted."""
        waiting, dropped = self.waiting, 0
        while waiting:
            waiting.popleft()
            dropped += 1
        self._stats.backlogged += dropped
        self._stats.backlog_dropped += dropped
        self._bytes, self._mixed = 0, False


class AsyncBacklog:
    """The asyncio face's backlog: Backlog's bounds and batches, sent by a task on the producer's event loop.

    Everything runs on that one loop, so there is no lock: a message leaves `_items` only once the socket took
    the ZeroMQ message that carries it, and a close() that cannot await finds every unsent message there.
    A producer that never awaits anything else fills the backlog, then waits for room while the task sends.
    """

    def __init__(self, sock: zmq.Socket[Any], waker: Any, who: str, stats: Any) -> None:
        self.limit = BACKLOG_MAX
        """Messages held at most (the owner may set another bound); 0: the owner never uses this backlog."""
        self.active = False
        """True while a message waits here: every new message must go behind it."""
        self._sock = sock  # the socket's sync face: sends that never wait
        self._waker = waker  # its asyncio face: waits for room
        self._who = who
        self._stats = stats
        self._items: list[Any] = []  # _items[:_head] are sent; the rest wait, in order
        self._head = 0
        self._bytes = 0  # of the waiting messages that are not small
        self._changed = asyncio.Event()  # set whenever the task sent something
        self._task: asyncio.Task[None] | None = None

    def take(self, message: bytes) -> bool:
        """Add a small one-frame message behind an active backlog if there is room now."""
        if len(self._items) - self._head < self.limit and len(message) <= BACKLOG_SMALL:
            self._items.append(message)
            return True
        return False

    def add(self, frames: list[Any]) -> bool:
        """Add any message if there is room now (an empty backlog always takes one), starting the task if it is not
        running; False if there is no room."""
        item = frames[0] if len(frames) == 1 else frames
        size = size_of(item)
        waiting = len(self._items) - self._head
        if waiting and (waiting >= self.limit or self._bytes + size > BACKLOG_MAX_BYTES):
            return False
        self._items.append(item)
        if not is_small(item):
            self._bytes += size
        self.active = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"zfabric-backlog-{self._who}")
        return True

    async def put(self, frames: list[Any], timeout: float | None) -> bool:
        """`add`, waiting at most `timeout` s (None: forever) for room; False if there was none in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.add(frames):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
        return True

    async def wait_empty(self, timeout: float) -> None:
        """Wait at most `timeout` s until everything taken in was handed to the socket."""
        deadline = time.monotonic() + timeout
        while self.active and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return

    def _send_next(self) -> bool:
        """Hand the next ZeroMQ message (a batch, or one message) to the socket if it takes it now; False if not."""
        items, i = self._items, self._head
        j = batch_end(items, i, len(items), None)
        try:
            send_frames(self._sock, batch_frames(items, i, j), _NOBLOCK)
        except zmq.Again:
            return False
        self._stats.batches_sent += j - i > 1
        self._stats.backlogged += j - i
        if j == i + 1 and not is_small(items[i]):
            self._bytes -= size_of(items[i])
        self._head = j
        if j == len(items):
            items.clear()
            self._head = self._bytes = 0
            self.active = False
        elif j >= 1024 and 2 * j >= len(items):  # what was sent, forgotten (the list stays within twice its bound)
            del items[:j]
            self._head = 0
        self._changed.set()
        return True

    async def _run(self) -> None:
        try:
            while self.active:
                if not self._send_next():
                    await self._waker.poll(_POLL_MS, _POLLOUT)
        except zmq.ZMQError as exc:  # the socket failed under it (a context terminated): nothing more goes
            log.error("%s: sending its backlog failed: %s", self._who, exc)
            self._drop()

    def _drop(self) -> int:
        dropped = len(self._items) - self._head
        self._stats.backlog_dropped += dropped
        self._items.clear()
        self._head = self._bytes = 0
        self.active = False
        self._changed.set()
        return dropped

    def close(self, timeout: float | None) -> int:
        """Send what waits from the caller (on the loop's thread, where the task cannot run meanwhile), for at most
        `timeout` s (None: forever), and stop the task; how many messages were dropped because the time ran out."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # its loop is closed: the task will never run again anyway
                pass
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.active:
                if self._send_next():
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                zmq.zmq_poll([(self._sock, _POLLOUT)], _POLL_MS if left is None else min(_POLL_MS, wait_ms(left)))
        except zmq.ZMQError as exc:
            log.error("%s: sending its backlog failed: %s", self._who, exc)
        return self._drop()
