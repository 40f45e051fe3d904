"""Scatter-gather: deadline, quorum, missing members named, late replies kept out of later rounds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from zfabric import ConfigError, Envelope

from .conftest import wait_until
from .faces import Face


def member(name: str, delay: float = 0.0) -> Callable[[Envelope], Any]:
    def handler(env: Envelope) -> dict[str, Any]:
        if delay:
            time.sleep(delay)
        if env.body.get("fail") == name:
            raise RuntimeError(f"{name} is out of stock")
        return {"member": name, "round": env.body["round"], "price": 10 + len(name)}

    return handler


def unused_endpoint() -> str:
    with zmq.Context() as c:
        s = c.socket(zmq.ROUTER)
        s.bind("tcp://127.0.0.1:0")
        ep = s.getsockopt_string(zmq.LAST_ENDPOINT)
        s.close(0)
    return ep


@pytest.fixture
def repliers(face: Face) -> dict[str, Any]:
    """Four live members: three quick, one slow (0.8 s)."""
    live = {name: face.replier("tcp://127.0.0.1:0", member(name)) for name in ("a", "bb", "ccc")}
    live["slow"] = face.replier("tcp://127.0.0.1:0", member("slow", 0.8))
    return live


@pytest.fixture
def group(repliers: dict[str, Any]) -> dict[str, str]:
    """Five members: the four live ones and one dead (nothing listening)."""
    return {**{name: r.endpoint for name, r in repliers.items()}, "dead": unused_endpoint()}


def test_deadline_returns_on_time_naming_the_missing_members(face: Face, group: dict[str, str]) -> None:
    scatterer = face.scatterer(group, deadline=0.5)
    start = time.monotonic()
    result = scatterer.scatter({"round": 1}, reduce=lambda bodies: min(b["price"] for b in bodies))
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 0.6, elapsed
    assert sorted(result.answered) == ["a", "bb", "ccc"]
    assert set(result.missing) == {"slow", "dead"}
    assert result.missing_reasons["slow"] == "no reply before the deadline"
    assert result.value == 11
    assert not result.complete and not result.quorum_met
    assert [r.member for r in result.replies] == result.answered  # arrival order
    assert all(r.body["round"] == 1 for r in result.replies)


def test_quorum_returns_as_soon_as_enough_members_answered(face: Face, group: dict[str, str]) -> None:
    scatterer = face.scatterer(group, deadline=5.0, quorum=3)
    start = time.monotonic()
    result = scatterer.scatter({"round": 1})
    assert time.monotonic() - start < 0.5
    assert len(result.replies) >= 3 and result.quorum_met
    assert "slow" not in result.answered


def test_a_late_reply_is_counted_not_mixed_into_the_next_round(face: Face, group: dict[str, str], repliers: dict[str, Any]) -> None:
    scatterer = face.scatterer(group, deadline=0.3)
    first = scatterer.scatter({"round": 1})
    assert "slow" in first.missing
    assert wait_until(lambda: repliers["slow"].stats.replies == 1)  # answered round 1 after it closed
    second = scatterer.scatter({"round": 2}, deadline=0.3)
    assert all(r.body["round"] == 2 for r in second.replies)
    assert "slow" in second.missing
    assert scatterer.stats.late_replies == 1


def test_a_member_error_is_reported_per_member(face: Face, group: dict[str, str]) -> None:
    quick = {k: v for k, v in group.items() if k in ("a", "bb", "ccc")}
    scatterer = face.scatterer(quick, deadline=5.0)
    result = scatterer.scatter({"round": 1, "fail": "bb"})
    assert result.complete
    assert sorted(result.answered) == ["a", "ccc"]
    assert result.errors["bb"].type == "RuntimeError"
    assert "out of stock" in result.errors["bb"].message
    assert result.errors["bb"].member == "bb"


def test_group_validation(face: Face) -> None:
    with pytest.raises(ConfigError, match="quorum"):
        face.scatterer({"a": "tcp://127.0.0.1:1"}, quorum=2)
    with pytest.raises(ConfigError, match="at least one member"):
        face.scatterer({})
    with pytest.raises(ConfigError, match=r"mapping of name -> endpoint or \(name, endpoint\) pairs"):
        face.scatterer([unused_endpoint()])  # endpoints without names


def test_an_infinite_deadline_waits_for_every_member(face: Face, repliers: dict[str, Any]) -> None:
    scatterer = face.scatterer({name: r.endpoint for name, r in repliers.items()}, deadline=math.inf)
    result = scatterer.scatter({"round": 1})
    assert result.complete
    assert sorted(result.answered) == ["a", "bb", "ccc", "slow"]


def test_every_member_gets_the_group_name_the_headers_and_the_body_as_sent(face: Face) -> None:
    """A round's request carries the group's name as its topic, the caller's headers and the body whole: a small
    body inside the message, raw bytes of 16 KiB or more in a frame of their own. A group renamed between rounds
    names the next rounds' requests."""

    def describe(env: Envelope) -> dict[str, Any]:
        body = env.body if not isinstance(env.body, bytes) else {"raw": len(env.body), "ends": env.body[-3:]}
        return {"topic": env.topic, "headers": env.headers, "body": body, "deadline_set": env.deadline is not None}

    members = {name: face.replier("tcp://127.0.0.1:0", describe).endpoint for name in ("a", "b")}
    scatterer = face.scatterer(members, group="pricing", deadline=5.0)
    result = scatterer.scatter({"sku": "A-1"}, headers={"trace": "t-1"})
    assert result.complete
    assert {r.member: r.body for r in result.replies} == {
        name: {"topic": "pricing", "headers": {"trace": "t-1"}, "body": {"sku": "A-1"}, "deadline_set": True}
        for name in ("a", "b")}
    big = bytes(range(256)) * 80 + b"end"  # 20 KiB and 3 bytes: its own frame
    assert [r.body for r in scatterer.scatter(big).replies] == [
        {"topic": "pricing", "headers": {}, "body": {"raw": len(big), "ends": b"end"}, "deadline_set": True}] * 2
    scatterer.group = "pricing.eu"
    assert {r.body["topic"] for r in scatterer.scatter({"sku": "B-2"}).replies} == {"pricing.eu"}


def test_every_reply_is_counted_once_whichever_way_it_is_read(face: Face) -> None:
    """Replies to the round in flight are read by their bytes (the sync face), errors, raw bodies and late
    replies by the general decoder: every one is counted once, in the right counter, with its body whole."""
    late_sent: list[str] = []

    def answer(env: Envelope) -> Any:
        if env.body.get("fail"):
            raise ValueError("refused")
        if env.body.get("raw"):
            return b"\x00raw\xff" * 3
        if env.body.get("late"):
            time.sleep(0.3)
            late_sent.append(env.id.hex())
        return {"round": env.body["round"], "echo": [1, 2.5, "three", None, {"k": b"v"}]}

    members = {name: face.replier("tcp://127.0.0.1:0", answer).endpoint for name in ("a", "b", "c")}
    scatterer = face.scatterer(members, deadline=5.0)
    for n in range(20):
        result = scatterer.scatter({"round": n})
        assert result.complete and sorted(result.answered) == ["a", "b", "c"]
        assert all(r.body == {"round": n, "echo": [1, 2.5, "three", None, {"k": b"v"}]} for r in result.replies)
    assert (scatterer.stats.received, scatterer.stats.replies, scatterer.stats.rounds) == (60, 60, 20)

    failed = scatterer.scatter({"round": 20, "fail": True})
    assert failed.complete and set(failed.errors) == {"a", "b", "c"} and not failed.replies
    raw = scatterer.scatter({"round": 21, "raw": True})
    assert [r.body for r in raw.replies] == [b"\x00raw\xff" * 3] * 3
    late = scatterer.scatter({"round": 22, "late": True}, deadline=0.05)
    assert set(late.missing) == {"a", "b", "c"}
    assert wait_until(lambda: len(late_sent) == 3)
    # Each member sends its late reply before it reads this round's request: on each connection the late reply
    # comes first (the sync face reads it during this round, the asyncio face's reader as it comes).
    last = scatterer.scatter({"round": 23})
    assert last.complete and all(r.body["round"] == 23 for r in last.replies)
    assert wait_until(lambda: scatterer.stats.late_replies == 3)
    stats = scatterer.stats
    assert (stats.received, stats.replies, stats.remote_errors, stats.late_replies, stats.stray_replies) == \
        (72, 66, 3, 3, 0)
