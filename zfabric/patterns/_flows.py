"""Protocol logic without I/O, written once and driven by the sync and asyncio faces.

`RequestFlow` decides everything about a requester's in-flight requests: which socket
generation each went out on, when each attempt times out, what to retry and when a
fresh socket is due (Lazy Pirate), which replies are strays. `GatherBook` does the same
for scatter-gather rounds: who answered, when a round is over, which replies are late.
The drivers only move frames and wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._counters import Counters
from ..envelope import Envelope, Kind
from ..errors import RemoteError, RequestTimeout

_REPLY, _ERROR = Kind.REPLY, Kind.ERROR

MIN_SOCKET_AGE = 0.25
"""A retry opens a fresh socket unless the current one is younger than this (seconds)."""


def remote_error(env: Envelope, member: str | None = None) -> RemoteError:
    """The RemoteError an ERROR reply describes (tolerating a malformed body)."""
    body = env.body if isinstance(env.body, Mapping) else {}
    return RemoteError(
        str(body.get("type", "RemoteError")),
        str(body.get("message", env.body)),
        str(body.get("traceback", "")),
        member=member,
    )


@dataclass
class RequestCounters(Counters):
    """What a requester has seen."""

    replies: int = 0
    remote_errors: int = 0
    retries: int = 0
    timeouts: int = 0
    stray_replies: int = 0
    sockets_opened: int = 1


@dataclass(slots=True)
class _Pending:
    env: Envelope
    timeout: float
    retries_left: int
    due: float
    generation: int


class RequestFlow:
    """In-flight requests of one requester, their timers and their retries."""

    def __init__(self, stats: RequestCounters) -> None:
        self.stats = stats
        self.pending: dict[bytes, _Pending] = {}
        self.generation = 0
        self.generation_born: float | None = None
        """When the current generation's socket first carried a request (monotonic): set by the first submit,
        or by the requester for a request it never recorded (answered at once). The flow reads no clock itself."""
        self._older: dict[int, int] = {}
        """Requests pending per generation other than the current one. Counted from the moment a generation
        stops being current, so that the commonest case (one generation) pays nothing per request."""
        self._timers: dict[float, deque[tuple[float, bytes]]] = {}
        """(due, request id) of every attempt, by timeout: each in due order, as the clock never goes back,
        so that no timer is compared with another to keep them sorted. Stale ones (answered) go lazily."""

    def submit(self, env: Envelope, timeout: float, retries: int, now: float) -> None:
        """Record a request that is about to go out on the current generation."""
        if self.generation_born is None:
            self.generation_born = now
        self.pending[env.id] = _Pending(env, timeout, retries, now + timeout, self.generation)
        self._timer(timeout).append((now + timeout, env.id))

    def on_reply(self, env: Envelope) -> tuple[bytes, Any] | None:
        """(request id, outcome) for a reply to a pending request; the outcome may be a RemoteError."""
        corr = env.correlation_id
        kind = env.kind
        # The kind is checked first: anything else that names a pending request must leave it pending.
        p = self.pending.pop(corr, None) if corr is not None and (kind is Kind.REPLY or kind is Kind.ERROR) else None
        if p is None:
            self.stats.stray_replies += 1
            return None
        if p.generation != self.generation:
            self._older[p.generation] -= 1
        if kind is Kind.ERROR:
            self.stats.remote_errors += 1
            return corr, remote_error(env)  # type: ignore[return-value]
        self.stats.replies += 1
        return corr, env.body  # type: ignore[return-value]

    def _timer(self, timeout: float) -> deque[tuple[float, bytes]]:
        timers = self._timers.get(timeout)
        if timers is None:
            timers = self._timers[timeout] = deque()
        return timers

    def _earliest(self) -> deque[tuple[float, bytes]] | None:
        """The timers whose first is the earliest live attempt, after dropping stale ones; None when none is live."""
        earliest = None
        pending = self.pending
        for timeout, timers in list(self._timers.items()):
            while timers:
                due, rid = timers[0]
                p = pending.get(rid)
                if p is not None and p.due == due:
                    break
                timers.popleft()
            if not timers:
                del self._timers[timeout]
            elif earliest is None or timers[0][0] < earliest[0][0]:
                earliest = timers
        return earliest

    def next_due(self) -> float | None:
        """When the earliest pending attempt times out (monotonic seconds), or None."""
        earliest = self._earliest()
        return None if earliest is None else earliest[0][0]

    def expire(self, now: float) -> tuple[list[tuple[bytes, RequestTimeout]], list[Envelope], bool]:
        """Handle every attempt due by `now` (monotonic, as every `now` given to the flow: never less than an
        earlier one): (failures, envelopes to resend, open a fresh socket first?)."""
        failures: list[tuple[bytes, RequestTimeout]] = []
        retry: list[_Pending] = []
        while True:
            earliest = self._earliest()
            if earliest is None or earliest[0][0] > now:
                break
            _, rid = earliest.popleft()
            p = self.pending[rid]
            if p.retries_left > 0:
                retry.append(p)
                continue
            del self.pending[rid]
            if p.generation != self.generation:
                self._older[p.generation] -= 1
            self.stats.timeouts += 1
            attempts = p.env.attempt
            failures.append((rid, RequestTimeout(
                f"no reply to request {rid.hex()} after {attempts} attempt(s) of {p.timeout:g} s",
                request_id=rid, attempts=attempts, timeout=p.timeout,
            )))
        born = now if self.generation_born is None else self.generation_born
        fresh = bool(retry) and now - born >= MIN_SOCKET_AGE
        if fresh:
            current = self.generation
            self._older[current] = sum(1 for p in self.pending.values() if p.generation == current)
            self.generation += 1
            self.generation_born = now
            self.stats.sockets_opened += 1
        resend = []
        for p in retry:
            if p.generation != self.generation:
                self._older[p.generation] -= 1
                p.generation = self.generation
            p.retries_left -= 1
            p.env = p.env.with_attempt(p.env.attempt + 1)
            p.due = now + p.timeout
            self._timer(p.timeout).append((p.due, p.env.id))
            self.stats.retries += 1
            resend.append(p.env)
        return failures, resend, fresh

    def forget(self, rid: bytes) -> None:
        """Drop a request the caller no longer waits for (cancelled)."""
        p = self.pending.pop(rid, None)
        if p is not None and p.generation != self.generation:
            self._older[p.generation] -= 1

    def idle_generations(self, live: Sequence[int]) -> list[int]:
        """Generations among `live` that are not current and have nothing pending: close them (the flow forgets
        them here)."""
        idle = [g for g in live if g != self.generation and self._older.get(g, 0) <= 0]
        for g in idle:
            self._older.pop(g, None)
        return idle


# ---- scatter-gather ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberReply:
    """One member's successful answer, with how long it took."""

    member: str
    body: Any
    elapsed: float


@dataclass(frozen=True)
class GatherResult:
    """The outcome of one scatter round.

    `replies` are the successful answers in arrival order; `errors` the members whose
    handler raised; `missing` those that did not answer in time, with a reason each in
    `missing_reasons`. `value` is what the caller's reduce function made of the replies.
    """

    request_id: bytes
    members: tuple[str, ...]
    replies: tuple[MemberReply, ...]
    errors: Mapping[str, RemoteError]
    missing: tuple[str, ...]
    missing_reasons: Mapping[str, str]
    quorum: int | None
    elapsed: float
    value: Any = None

    @property
    def answered(self) -> list[str]:
        """Members that replied successfully, in arrival order."""
        return [r.member for r in self.replies]

    @property
    def bodies(self) -> list[Any]:
        """The reply bodies in arrival order."""
        return [r.body for r in self.replies]

    @property
    def complete(self) -> bool:
        """Every member answered (successfully or with an error)."""
        return not self.missing

    @property
    def quorum_met(self) -> bool:
        """At least `quorum` successful replies (all members when no quorum was asked for)."""
        need = len(self.members) if self.quorum is None else self.quorum
        return len(self.replies) >= need


@dataclass
class GatherCounters(Counters):
    """What a scatterer has seen."""

    rounds: int = 0
    replies: int = 0
    remote_errors: int = 0
    late_replies: int = 0
    stray_replies: int = 0
    unsent: int = 0


@dataclass
class GatherRound:
    """One request to every member, gathered until all answered, a quorum, or the deadline."""

    request_id: bytes
    members: tuple[str, ...]
    quorum: int | None
    started: float
    deadline: float
    replies: list[MemberReply] = field(default_factory=list)
    errors: dict[str, RemoteError] = field(default_factory=dict)
    unsent: dict[str, str] = field(default_factory=dict)

    def on_reply(self, member: str, env: Envelope, now: float) -> bool:
        """Record one member's reply; False for a duplicate or a non-member."""
        if env.kind is not _ERROR:
            return self.on_body(member, env.body, now)
        if not self._first_from(member):
            return False
        self.errors[member] = remote_error(env, member)
        return True

    def on_body(self, member: str, body: Any, now: float) -> bool:
        """Record one member's successful reply, by its body; False for a duplicate or a non-member."""
        if not self._first_from(member):
            return False
        self.replies.append(MemberReply(member, body, now - self.started))
        return True

    def _first_from(self, member: str) -> bool:
        """True if `member` belongs to the round and has not answered it yet."""
        if member not in self.members or member in self.errors:
            return False
        for r in self.replies:  # a few: a loop costs less than a generator
            if r.member == member:
                return False
        return True

    def mark_unsent(self, member: str, reason: str) -> None:
        """The request could not be handed to `member` at all."""
        self.unsent[member] = reason

    def finished(self, now: float) -> bool:
        """All members accounted for, the quorum reached, or the deadline passed."""
        if now >= self.deadline:
            return True
        if self.quorum is not None and len(self.replies) >= self.quorum:
            return True
        return len(self.replies) + len(self.errors) + len(self.unsent) >= len(self.members)

    def result(self, now: float, reduce: Callable[[list[Any]], Any] | None) -> GatherResult:
        """The round's outcome; `reduce` aggregates the reply bodies (arrival order)."""
        answered = {r.member for r in self.replies} | set(self.errors)
        missing = tuple(m for m in self.members if m not in answered)
        reasons = {m: self.unsent.get(m, "no reply before the deadline" if now >= self.deadline else "not needed: quorum reached")
                   for m in missing}
        bodies = [r.body for r in self.replies]
        return GatherResult(
            self.request_id, self.members, tuple(self.replies), dict(self.errors), missing, reasons,
            self.quorum, now - self.started, reduce(bodies) if reduce is not None else None,
        )


class GatherBook:
    """Open rounds by request id, and recently closed ones so late replies are told apart."""

    def __init__(self, stats: GatherCounters, remember: int = 4096) -> None:
        self.stats = stats
        self.rounds: dict[bytes, GatherRound] = {}
        self._closed: deque[bytes] = deque(maxlen=remember)
        self._closed_set: set[bytes] = set()

    def open(self, round_: GatherRound) -> None:
        """Start tracking a round."""
        self.rounds[round_.request_id] = round_
        self.stats.rounds += 1

    def dispatch(self, member: str, env: Envelope, now: float) -> GatherRound | None:
        """The open round this reply belongs to (after recording it), or None if late or stray."""
        corr = env.correlation_id
        round_ = self.rounds.get(corr) if corr is not None else None
        kind = env.kind
        if round_ is None or (kind is not _REPLY and kind is not _ERROR):
            if corr in self._closed_set:
                self.stats.late_replies += 1
            else:
                self.stats.stray_replies += 1
            return None
        if round_.on_reply(member, env, now):
            if kind is _ERROR:
                self.stats.remote_errors += 1
            else:
                self.stats.replies += 1
        return round_

    def close(self, round_: GatherRound) -> None:
        """Stop tracking a round; its later replies count as late."""
        self.rounds.pop(round_.request_id, None)
        if len(self._closed) == self._closed.maxlen:
            self._closed_set.discard(self._closed[0])
        self._closed.append(round_.request_id)
        self._closed_set.add(round_.request_id)
