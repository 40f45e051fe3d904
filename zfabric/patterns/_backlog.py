"""A producer's backlog: small messages taken in while every consumer's queue is full, sent as batches.

A consumer that falls behind spends its time receiving ZeroMQ messages one by one: about 2 us each in
Python, against about 0.9 us per message of a batch. So once `Producer.send` finds every consumer's queue
full, it keeps taking small messages into this bounded backlog and returns, and a flusher thread sends
them, up to BACKLOG_BATCH to a ZeroMQ message, as soon as the socket takes more. Consumers receive the
same messages in the same order; only the framing differs. A producer that keeps up never uses it: each
message goes out at once, on its own, as before. (NATS clients keep a pending buffer that a flusher
writes out in the same way; here it only fills under back-pressure.)

While the backlog holds anything, the flusher owns the socket and every new message joins the backlog
behind it, so order is kept; the lock hands the socket back once the backlog is empty.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import zmq

from .. import codec
from .._socket import send_frames

log = logging.getLogger("zfabric.queue")

BACKLOG_MAX = 1000
"""Messages a producer's backlog holds at most by default (besides the batch being sent); send waits beyond.
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


class Backlog:
    """Messages accepted but not yet handed to the socket, and the thread that sends them.

    The owner sends through the socket itself only while `active` is False; otherwise it calls `take` or
    `put`, holding `lock`. Only the owner's own `put` turns `active` on, so the owner may read it without
    the lock: off, it stays off, and the flusher has finished with the socket. Each message is kept as
    its one frame (bytes), or as its list of frames.
    """

    def __init__(self, sock: zmq.Socket[Any], who: str, stats: Any) -> None:
        self.lock = threading.Lock()
        self.limit = BACKLOG_MAX
        """Messages held at most (the owner may set another bound); 0: the owner never uses this backlog."""
        self._changed = threading.Condition(self.lock)
        self._sock = sock
        self._who = who
        self._stats = stats
        self.active = False
        """True while any message waits here or is being sent: the flusher owns the socket. Read holding `lock`."""
        self._waiting: list[Any] = []  # messages taken in, not yet taken out by the flusher
        self._bytes = 0  # of the messages in _waiting that are not small
        self._mixed = False  # _waiting holds a message that is not small (and not to be batched)
        self._give_up_at: float | None = None  # set by close(): the flusher drops what it could not send by then
        self._thread: threading.Thread | None = None

    def take(self, message: bytes) -> bool:
        """Add a small one-frame message behind an active backlog if there is room now (holding `lock`).
        (Not counted in bytes: `limit` of them hold at most `limit` * BACKLOG_SMALL.)"""
        waiting = self._waiting
        if len(waiting) < self.limit and len(message) <= BACKLOG_SMALL:
            waiting.append(message)
            return True
        return False

    def put(self, frames: list[Any], timeout: float | None) -> bool:
        """Add a message (holding `lock`), waiting at most `timeout` s (None: forever) for room;
        False if there was none in time, and the message was not taken."""
        size = len(frames[0]) if len(frames) == 1 else sum(map(len, frames))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._waiting and (len(self._waiting) >= self.limit or self._bytes + size > BACKLOG_MAX_BYTES):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._changed.wait(left)
        if len(frames) == 1 and size <= BACKLOG_SMALL:
            self._waiting.append(frames[0])
        else:
            self._waiting.append(frames[0] if len(frames) == 1 else frames)
            self._bytes += size
            self._mixed = True
        if not self.active:
            self.active = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"zfabric-backlog-{self._who}", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._waiting:
                    self.active = False
                    self._changed.notify_all()  # close() waits for this
                    if self._give_up_at is not None:
                        return
                    self._changed.wait()
                items, mixed = self._waiting, self._mixed
                self._waiting, self._bytes, self._mixed = [], 0, False
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
                    self._stats.backlog_dropped += unsent + len(self._waiting)
                    self._waiting, self._bytes = [], 0

    def _send_all(self, items: list[Any], mixed: bool) -> int:
        """Send `items` in order, small neighbours batched; how many were left unsent when close() gave up.
        `mixed`: some item is not small (checked one by one); else each batch takes an even share."""
        sock, stats = self._sock, self._stats
        i, n = 0, len(items)
        if not mixed:  # all small: BACKLOG_BATCH_BYTES by their average size
            per = max(1, min(BACKLOG_BATCH, BACKLOG_BATCH_BYTES * n // max(1, sum(map(len, items)))))
        while i < n:
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                return n - i  # close() is waiting for this thread, past the linger
            if mixed:
                j, size = i, 0
                while j < n and j - i < BACKLOG_BATCH and size < BACKLOG_BATCH_BYTES:
                    item = items[j]
                    if type(item) is not bytes or len(item) > BACKLOG_SMALL:
                        break
                    size += len(item)
                    j += 1
            else:
                j = min(n, i + per)
            if j - i > 1:
                frames = codec.join_batch(items[i:j])
                stats.batches_sent += 1
            else:
                j = i + 1
                item = items[i]
                frames = [item] if type(item) is bytes else item
            while True:
                try:
                    send_frames(sock, frames, _NOBLOCK)
                    break
                except zmq.Again:
                    if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                        return n - i
                    zmq.zmq_poll([(sock, _POLLOUT)], _POLL_MS)
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
            if self._waiting:  # the flusher stopped (or never got to them): they are dropped
                self._stats.backlog_dropped += len(self._waiting)
                self._waiting, self._bytes = [], 0
            return int(self._stats.backlog_dropped - dropped_before)
