"""The no-I/O protocol core, driven directly: every request ends exactly once, rounds end when promised."""

from __future__ import annotations

import time

from hypothesis import example, given, settings
from hypothesis import strategies as st

from zfabric import Envelope, Kind, RemoteError, RequestTimeout
from zfabric.envelope import IdSource
from zfabric.patterns._flows import (
    MIN_SOCKET_AGE,
    GatherBook,
    GatherCounters,
    GatherRound,
    RequestCounters,
    RequestFlow,
)

ids = IdSource()


def request(n: int) -> Envelope:
    return Envelope(ids.next(), Kind.REQUEST, "", n, created_at=time.time())


def reply_to(req: Envelope, kind: Kind = Kind.REPLY, body: object = "ok") -> Envelope:
    return Envelope(ids.next(), kind, "", body, correlation_id=req.id)


@settings(max_examples=200, deadline=None)
@example([("submit", 1), ("tick", 3), ("submit", 2), ("tick", 8), ("reply", 1), ("tick", 9)], 1)
# a retry opens a fresh socket while a later request still waits on the old one, which closes once it is answered
@example([("submit", 1), ("submit", 3), ("tick", 5), ("tick", 6)], 1)
# a shorter timeout behind a longer one: its attempt is due first, though its timer queue comes second
@example([("submit", 1), ("wrong", 0), ("tick", 30)], 0)
# an answer of the wrong kind that names a pending request is a stray: the request still ends (here, timed out)
@given(st.lists(st.tuples(st.sampled_from(["submit", "reply", "error", "stray", "wrong", "tick"]), st.integers(0, 30)),
                max_size=80),
       st.integers(0, 3))
def test_every_request_ends_exactly_once_whatever_happens(ops: list[tuple[str, int]], retries: int) -> None:
    stats = RequestCounters()
    flow = RequestFlow(stats)
    now = 1000.0
    submitted: list[Envelope] = []
    ended: dict[bytes, object] = {}
    for op, arg in ops:
        if op == "submit":
            env = request(arg)
            submitted.append(env)
            flow.submit(env, 1.0 if arg % 3 else 0.4, retries, now)  # two timeouts: two timer queues
        elif op in ("reply", "error") and submitted:
            target = submitted[arg % len(submitted)]
            if op == "reply":
                out = flow.on_reply(reply_to(target))
            else:
                out = flow.on_reply(reply_to(target, Kind.ERROR, {"type": "E", "message": "m"}))
            if out is not None:
                assert out[0] not in ended, "a request ended twice"
                ended[out[0]] = out[1]
        elif op == "stray":
            assert flow.on_reply(reply_to(request(-1))) is None
        elif op == "wrong" and submitted:  # a message or a request that carries a pending request's id
            target = submitted[arg % len(submitted)]
            before = stats.stray_replies
            assert flow.on_reply(reply_to(target, Kind.MESSAGE if arg % 2 else Kind.REQUEST)) is None
            assert stats.stray_replies == before + 1
        elif op == "tick":
            now += arg / 10
            failures, resend, fresh = flow.expire(now)
            for rid, exc in failures:
                assert rid not in ended
                ended[rid] = exc
            assert all(env.id in flow.pending for env in resend)
            assert all(p.due > now for p in flow.pending.values()), "an attempt due was not handled"
            due = flow.next_due()
            assert due == min((p.due for p in flow.pending.values()), default=None)
        live = list(range(flow.generation + 1))
        busy = {p.generation for p in flow.pending.values()}
        assert flow.idle_generations(live) == [g for g in live if g != flow.generation and g not in busy]
    now += 10_000
    while flow.next_due() is not None:
        failures, _, _ = flow.expire(now)
        for rid, exc in failures:
            assert rid not in ended
            ended[rid] = exc
        now += 10_000
    assert set(ended) == {e.id for e in submitted}
    assert not flow.pending
    for outcome in ended.values():
        assert outcome == "ok" or isinstance(outcome, (RemoteError, RequestTimeout))


def test_retry_bumps_the_attempt_and_a_fresh_socket_only_when_the_current_is_not_new() -> None:
    flow = RequestFlow(RequestCounters())
    env = request(1)
    flow.submit(env, 1.0, 2, now=0.0)
    failures, resend, fresh = flow.expire(MIN_SOCKET_AGE + 1.0)
    assert not failures and fresh and [e.attempt for e in resend] == [2] and resend[0].id == env.id
    failures, resend, fresh = flow.expire(MIN_SOCKET_AGE + 1.0 + 1.0)
    assert resend and resend[0].attempt == 3
    assert fresh  # a second has passed since the last fresh socket
    failures, resend, fresh = flow.expire(100.0)
    assert [f[1].attempts for f in failures] == [3] and not resend


def test_gather_round_ends_on_all_quorum_or_deadline() -> None:
    members = ("a", "b", "c")
    everyone = GatherRound(b"r1", members, None, started=0.0, deadline=1.0)
    for m in members[:2]:
        everyone.on_reply(m, Envelope(b"x", Kind.REPLY, "", m, correlation_id=b"r1"), now=0.1)
    assert not everyone.finished(0.2)
    assert everyone.finished(1.0)
    result = everyone.result(1.0, reduce=lambda bodies: "+".join(bodies))
    assert result.value == "a+b" and result.missing == ("c",) and not result.complete
    assert result.missing_reasons == {"c": "no reply before the deadline"}

    quorum = GatherRound(b"r2", members, 2, started=0.0, deadline=1.0)
    quorum.on_reply("b", Envelope(b"x", Kind.ERROR, "", {"type": "E", "message": "no"}, correlation_id=b"r2"), 0.1)
    quorum.on_reply("a", Envelope(b"x", Kind.REPLY, "", 1, correlation_id=b"r2"), 0.1)
    assert not quorum.finished(0.2), "an error reply must not count towards the quorum"
    quorum.on_reply("c", Envelope(b"x", Kind.REPLY, "", 2, correlation_id=b"r2"), 0.3)
    assert quorum.finished(0.3) and quorum.result(0.3, None).quorum_met
    assert not quorum.on_reply("c", Envelope(b"x", Kind.REPLY, "", 2, correlation_id=b"r2"), 0.4), "a duplicate counted twice"


def test_gather_book_tells_late_replies_from_strays() -> None:
    stats = GatherCounters()
    book = GatherBook(stats, remember=2)
    rounds = [GatherRound(bytes([i]), ("a",), None, 0.0, 1.0) for i in range(3)]
    for r in rounds:
        book.open(r)
        book.close(r)
    book.dispatch("a", Envelope(b"x", Kind.REPLY, "", 1, correlation_id=bytes([2])), 2.0)
    book.dispatch("a", Envelope(b"x", Kind.REPLY, "", 1, correlation_id=bytes([0])), 2.0)  # forgotten by now
    book.dispatch("a", Envelope(b"x", Kind.REPLY, "", 1, correlation_id=b"zz"), 2.0)
    assert (stats.late_replies, stats.stray_replies) == (1, 2)
