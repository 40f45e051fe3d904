"""Scatter-gather (ROUTER -> ROUTER): one request to every member of a group, replies gathered back.

Members are ordinary repliers (`Replier`/`AsyncReplier`) with a name. The scatterer's
ROUTER connects to each member under that name (CONNECT_ROUTING_ID), so it can address
each one and knows who each reply came from. A round ends when every member answered,
when `quorum` successful replies arrived, or at the deadline, whichever comes first; the
`GatherResult` names who answered, who failed, who is missing and why. A reply that
arrives after its round ended is counted in `stats.late_replies`, never mixed into the
next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq

from .. import codec
from .._receive import count_bad, decode_counted
from .._socket import (
    AnyContext,
    SocketOwner,
    next_frames,
    rearm,
    recv_frames,
    send_routed,
    wait_ms,
)
from ..endpoint import Endpoint
from ..envelope import IdSource, Kind
from ..errors import ConfigError, DecodeError
from ..options import UNSET, SocketOptions, Unset
from ._flows import GatherBook, GatherCounters, GatherResult, GatherRound

_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_zmq_poll = zmq.zmq_poll
_decode_message = codec.decode_message
_NOT_A_REPLY = codec.NOT_A_REPLY

log = logging.getLogger("zfabric.scatter")

Members = Mapping[str, str | Endpoint] | Sequence[tuple[str, str | Endpoint]]
Reduce = Callable[[list[Any]], Any]


def _members(members: Members) -> list[tuple[str, Endpoint]]:
    items = list(members.items()) if isinstance(members, Mapping) else list(members)
    if not items:
        raise ConfigError("a scatter group needs at least one member")
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ConfigError(f"members must be a mapping of name -> endpoint or (name, endpoint) pairs, got {item!r} "
                              "in the group")
    names = [name for name, _ in items]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"member names must be unique, non-empty strings, got {names}")
    return [(name, Endpoint.parse(ep, bind=False)) for name, ep in items]


class _ScattererBase(SocketOwner):
    """The no-I/O half: the group, round bookkeeping, request frames."""

    _socket_type = zmq.ROUTER
    _tune = {zmq.ROUTER_MANDATORY: 1}

    def __init__(
        self,
        members: Members,
        *,
        group: str = "",
        deadline: float = 1.0,
        quorum: int | None = None,
        options: SocketOptions | None = None,
        context: AnyContext | None = None,
    ) -> None:
        pairs = _members(members)
        self.members = tuple(name for name, _ in pairs)
        self.group = group
        self.deadline = deadline
        self.quorum = self._check_quorum(quorum)
        super().__init__([ep for _, ep in pairs], options=options, context=context,
                         routing_ids=[name.encode() for name in self.members])
        self.stats = GatherCounters()
        self.book = GatherBook(self.stats)
        self._ids = IdSource()
        self._routes = [(name, name.encode()) for name in self.members]
        self._names = {route: name for name, route in self._routes}
        self._stamp = codec.Stamp(self._ids, group, Kind.REQUEST)

    def _check_quorum(self, quorum: int | None) -> int | None:
        if quorum is not None and not 1 <= quorum <= len(self.members):
            raise ConfigError(f"quorum must be between 1 and the group size {len(self.members)}, got {quorum}")
        return quorum

    def _open_round(self, body: Any, headers: Mapping[str, Any] | None, deadline: float | Unset,
                    quorum: int | None | Unset) -> tuple[GatherRound, list[Any]]:
        self._check_open()
        d = self.deadline if deadline is UNSET else deadline
        q = self.quorum if quorum is UNSET else self._check_quorum(quorum)
        if self._stamp.topic != self.group:  # `group` was changed since
            self._stamp = codec.Stamp(self._ids, self.group, Kind.REQUEST)
        now_wall, now = time.time(), time.monotonic()
        if not headers and codec.is_plain(body):
            env, message = self._stamp.plain(body, now_wall, None, now_wall + d)
            frames = [message]
        else:
            env, frames = self._stamp.encode(body, now_wall, now_wall + d, headers)
        round_ = GatherRound(env.id, self.members, q, now, now + d)
        self.book.open(round_)
        return round_, frames

    def _send_all(self, round_: GatherRound, frames: list[Any], sock: zmq.Socket[Any]) -> None:
        """Hand the request to every member through the sync socket `sock`, at once or not at all (counted)."""
        for name, route in self._routes:
            try:
                send_routed(sock, route, frames, _NOBLOCK)
                self.stats.sent += 1
            except zmq.Again:
                self.stats.unsent += 1
                round_.mark_unsent(name, "backlogged: its queue is at the high-water mark")
            except zmq.ZMQError as exc:
                self.stats.unsent += 1
                round_.mark_unsent(name, f"unreachable: {exc.strerror}")

    def _on_frames(self, frames: list[bytes]) -> GatherRound | None:
        if len(frames) == 2:  # [member, reply], the commonest: decoded directly
            try:
                env = _decode_message(frames[1], frames[1:])
            except DecodeError as exc:
                count_bad(exc, self.stats, self._who)
                return None
            self.stats.received += 1
        else:
            env = decode_counted(frames[1:], self.stats, self._who)
            if env is None:
                return None
        return self.book.dispatch(frames[0].decode(errors="replace"), env, time.monotonic())

    def _finish(self, round_: GatherRound, reduce: Reduce | None) -> GatherResult:
        self.book.close(round_)
        return round_.result(time.monotonic(), reduce)


class Scatterer(_ScattererBase):
    """Sends one request to every member and gathers the replies (one round at a time)."""

    def scatter(self, body: Any, *, deadline: float | Unset = UNSET, quorum: int | None | Unset = UNSET,
                reduce: Reduce | None = None, headers: Mapping[str, Any] | None = None) -> GatherResult:
        """Run one round; returns when all answered, the quorum is met, or the deadline passes."""
        round_, frames = self._open_round(body, headers, deadline, quorum)
        sock, stats, names, request_id = self._sock, self.stats, self._names, round_.request_id
        read = self._stamp.reply_body  # (after _open_round, which renews the stamp when the group was renamed)
        self._send_all(round_, frames, sock)
        while not round_.finished(time.monotonic()):
            # One receive per readiness: draining until a receive finds nothing would cost an exception (about
            # 2 us) after every reply, as replies mostly come one at a time.
            if _zmq_poll([(sock, _POLLIN)], wait_ms(round_.deadline - time.monotonic())):
                try:
                    got = recv_frames(sock, _NOBLOCK)
                except zmq.Again:  # not ours to take after all (a poll may wake for nothing)
                    continue
                # A member's reply to this round, byte for byte as a zfabric replier writes it, is read by its
                # bytes (Stamp.reply_body); anything else (an error, a late reply, foreign bytes) is decoded.
                if (len(got) == 2 and got[0] in names
                        and (answer := read(got[1], request_id)) is not _NOT_A_REPLY):
                    stats.received += 1
                    if round_.on_body(names[got[0]], answer, time.monotonic()):
                        stats.replies += 1
                else:
                    self._on_frames(got)
        return self._finish(round_, reduce)


class AsyncScatterer(_ScattererBase):
    """The asyncio face: any number of rounds may run at once on one socket."""

    _asyncio = True

    def __init__(self, members: Members, **kwargs: Any) -> None:
        super().__init__(members, **kwargs)
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def scatter(self, body: Any, *, deadline: float | Unset = UNSET, quorum: int | None | Unset = UNSET,
                      reduce: Reduce | None = None, headers: Mapping[str, Any] | None = None) -> GatherResult:
        """Run one round; returns when all answered, the quorum is met, or the deadline passes."""
        round_, frames = self._open_round(body, headers, deadline, quorum)
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        self._send_all(round_, frames, self._sync_sock)  # as the sync face: at once or not
        rearm(self._sock)  # the reader may be waiting
        if not round_.finished(time.monotonic()):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[round_.request_id] = waiter
            try:
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, round_.deadline - time.monotonic()))
            except TimeoutError:
                pass
            finally:
                self._waiters.pop(round_.request_id, None)
        return self._finish(round_, reduce)

    async def _read(self) -> None:
        """Settle rounds as replies arrive."""
        sync = self._sync_sock
        while not self._closed:
            try:
                frames = await next_frames(self._sock, sync)
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            round_ = self._on_frames(frames)
            if round_ is not None and round_.finished(time.monotonic()):
                waiter = self._waiters.get(round_.request_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def close(self, linger_ms: int | None = None) -> None:
        """Stop reading and close the socket."""
        if self._reader is not None:
            self._reader.cancel()
        super().close(0 if linger_ms is None else linger_ms)
