"""The envelope and its wire codec: round trips, and one clear error for anything else."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zfabric import DecodeError, EncodeError, Envelope, IdSource, Kind, codec


def sample(**changes: object) -> Envelope:
    env = Envelope(
        id=IdSource().next(), kind=Kind.REQUEST, topic="orders.eu", body={"sku": "A-1", "qty": 2, 7: [1.5, None]},
        correlation_id=b"\x01" * 16, reply_to="svc", attempt=3, created_at=1_700_000_000.25,
        deadline=1_700_000_030.0, headers={"trace": "abc", "n": 1}, seq=41,
    )
    return env.replace(**changes) if changes else env


def test_round_trip_keeps_every_field() -> None:
    env = sample()
    assert codec.decode(codec.encode(env)) == env


def test_small_messages_travel_as_one_frame_and_large_bodies_as_their_own() -> None:
    assert len(codec.encode(sample())) == 1
    assert len(codec.encode(sample(body=b"x" * 100))) == 1
    for body, frames in [("s" * (codec.INLINE_MAX * 2), 1), (b"r" * (codec.INLINE_MAX - 1), 1),
                         (b"r" * codec.INLINE_MAX, 2), (bytearray(b"r" * codec.INLINE_MAX), 2)]:
        env = sample(body=body)
        encoded = codec.encode(env)
        assert len(encoded) == frames, (len(body), type(body))
        assert codec.decode([bytes(f) for f in encoded]) == env


def test_stamp_encodes_what_the_generic_encoder_would_decode_to() -> None:
    ids = IdSource()
    stamp = codec.Stamp(ids, "orders")
    cases = [({"sku": "A-1", 7: [1.5]}, None, None, None), (b"raw", 1e9, {"trace": "t"}, 3),
             (b"big" * 30_000, None, {"k": 1}, 2**40), ("x" * 20_000, 5.5, None, None), (None, None, {}, 0),
             ({"n": 1}, 1e9 + 0.5, None, None), (b"raw", 7.25, {}, None)]  # a deadline alone: what a request has
    seen = set()
    for body, deadline, headers, seq in cases:
        env, frames = stamp.encode(body, 1_700_000_000.5, deadline, headers, seq)
        assert codec.decode([bytes(f) for f in frames]) == env
        assert (env.kind, env.topic, env.attempt, env.deadline, env.seq) == (Kind.MESSAGE, "orders", 1, deadline, seq)
        assert env.id[:8] == ids.origin
        seen.add(env.id)
    seen.add(ids.next())  # the stamp and the id source share one counter
    assert len(seen) == len(cases) + 1
    published = codec.Stamp(IdSource(), "sales").encode({"n": 1}, 1.0, seq=7)[0]
    assert codec.decode_published([b"sales", *codec.encode(published)]) == published


def test_an_inline_raw_body_is_written_as_the_generic_encoder_writes_it() -> None:
    """Stamp writes the bin header itself (one copy of the body): the bytes must be msgpack's, at every size."""
    stamp = codec.Stamp(IdSource(b"origin-1"), "orders")
    for n in (0, 1, 255, 256, 4096, codec.INLINE_MAX - 1):
        for body in (b"r" * n, bytearray(b"a" * n), memoryview(b"m" * n)):
            env, frames = stamp.encode(body, 1_700_000_000.5, None, {"k": n} if n % 2 else None)
            assert len(frames) == 1
            assert [bytes(f) for f in codec.encode(env)] == [bytes(frames[0])]
            assert codec.decode(frames).body == bytes(body)


def test_the_plain_stamp_path_writes_the_same_bytes_as_the_general_one() -> None:
    stamp = codec.Stamp(IdSource(b"origin-1"), "orders")
    twin = codec.Stamp(IdSource(b"origin-1"), "orders")  # the same ids, in the same order
    raw = [b"r" * n for n in (0, 1, 255, 256, 4096, codec.INLINE_MAX - 1)]  # every bin header size plain writes
    for n, body in enumerate([{"sku": "A-1"}, None, "x" * 20_000, [1, 2.5, b"bin"], 2**63, *raw]):
        assert codec.is_plain(body)
        for seq, deadline in [(None, None), (n, None), (2**63, None), (None, 1_800_000_000.5), (n, 1e9)]:
            # a queue's message has neither, a publisher's a seq, a request a deadline
            env, message = stamp.plain(body, 1_700_000_000.25 + n, seq, deadline)
            expected_env, expected = twin.encode(body, 1_700_000_000.25 + n, deadline, seq=seq)
            assert (env, [message]) == (expected_env, expected)
            assert codec.decode([message]) == env
    with pytest.raises(EncodeError, match="object"):
        stamp.plain(object(), 1.0)
    for body in (b"r" * codec.INLINE_MAX, bytearray(b"ba"), memoryview(b"m")):  # for Stamp.encode: own frame, or copied
        assert not codec.is_plain(body)


@pytest.mark.parametrize("deadline, headers", [(None, None), (None, {}), (9e9, None), (None, {"k": "v"})])
def test_stamp_batches_are_what_group_batches_makes_of_encode(deadline: float | None,
                                                              headers: dict[str, str] | None) -> None:
    stamp = codec.Stamp(IdSource(b"origin-1"), "orders")
    twin = codec.Stamp(IdSource(b"origin-1"), "orders")  # the same ids, in the same order
    bodies = ([{"n": n} for n in range(7)] + [b"x" * codec.INLINE_MAX] + ["y" * 3000] * 5
              + [b"small", bytearray(b"ba"), memoryview(b"m" * 70_000), None] + [{"n": n} for n in range(12)])
    got = stamp.batches(bodies, 1_700_000_000.5, deadline, headers, per=5, max_bytes=8000)
    expected = list(codec.group_batches((twin.encode(b, 1_700_000_000.5, deadline, headers) for b in bodies),
                                        5, 8000))
    assert [(envs, [bytes(f) for f in frames]) for envs, frames in got] == \
        [(envs, [bytes(f) for f in frames]) for envs, frames in expected]
    assert sum(len(envs) for envs, _ in got) == len(bodies)
    assert [len(envs) for envs, _ in got] == [5, 2, 1, 3, 4, 1, 5, 5, 3]  # count, size and large-body cuts


_batch_bodies = st.lists(st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=3), st.text(max_size=400), st.none(),
    st.binary(max_size=300), st.sampled_from([b"L" * codec.INLINE_MAX, bytearray(b"ba"), b"B" * 70_000])),
    max_size=40)


@settings(max_examples=150, deadline=None)
@given(bodies=_batch_bodies, per=st.integers(1, 8), max_bytes=st.integers(1, 3000),
       deadline=st.sampled_from([None, 1e9]), headers=st.sampled_from([None, {}, {"k": "v"}]))
def test_stamp_batches_cut_exactly_where_group_batches_does(bodies: list[object], per: int, max_bytes: int,
                                                            deadline: float | None, headers: dict[str, str] | None) -> None:
    stamp = codec.Stamp(IdSource(b"origin-1"), "orders")
    twin = codec.Stamp(IdSource(b"origin-1"), "orders")
    got = stamp.batches(bodies, 2.5, deadline, headers, per, max_bytes)
    expected = codec.group_batches((twin.encode(b, 2.5, deadline, headers) for b in bodies), per, max_bytes)
    assert [(envs, [bytes(f) for f in frames]) for envs, frames in got] == \
        [(envs, [bytes(f) for f in frames]) for envs, frames in expected]


def test_the_split_stamp_writes_what_encode_split_writes() -> None:
    stamp = codec.Stamp(IdSource(b"origin-1"), "orders")
    for body, deadline, headers in [({"sku": "A-1"}, None, None), (b"raw", 1e9, {"trace": "t"}),
                                    (b"big" * 30_000, None, {"k": 1}), (bytearray(b"ba"), None, None), (None, 5.5, {})]:
        env, frames = stamp.encode(body, 1_700_000_000.5, deadline, headers, split=True)
        assert frames == codec.encode_split(env)
        assert codec.decode([bytes(f) for f in frames]) == env


def test_stamp_refuses_what_a_receiver_would_refuse() -> None:
    stamp = codec.Stamp(IdSource(), "q")
    with pytest.raises(EncodeError, match="header keys must be strings"):
        stamp.encode("b", 1.0, headers={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(EncodeError, match="headers are not msgpack"):
        stamp.encode("b", 1.0, headers={"k": object()})
    with pytest.raises(EncodeError, match="object"):
        stamp.encode(object(), 1.0)


def test_raw_bytes_body_travels_verbatim_as_its_own_frame() -> None:
    payload = bytes(range(256)) * 1000
    frames = codec.encode(sample(body=payload))
    assert frames[1] is payload
    assert codec.decode([bytes(f) for f in frames]).body == payload


def test_published_frames_put_the_topic_first_for_prefix_matching() -> None:
    env = sample(kind=Kind.MESSAGE)
    frames = codec.encode_published(env)
    assert frames[0] == b"orders.eu"
    assert codec.decode_published(frames) == env


def test_envelope_is_immutable_and_with_attempt_returns_a_new_one() -> None:
    env = sample()
    later = env.with_attempt(4)
    assert (env.attempt, later.attempt, later.id) == (3, 4, env.id)
    with pytest.raises(AttributeError):
        env.attempt = 9  # type: ignore[misc]


def test_ids_from_one_source_are_unique_and_carry_the_origin() -> None:
    src = IdSource()
    ids = [src.next() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i[:8] == src.origin and len(i) == 16 for i in ids)


@pytest.mark.parametrize("body", [{"n": 1}, "text", None, [1, 2.5], b"small", b"x" * codec.INLINE_MAX, bytearray(b"ab"),
                                  object(), {1, 2}, {"deep": [object()]}])
@pytest.mark.parametrize("kind", [Kind.REPLY, Kind.ERROR])
def test_an_answer_is_encoded_as_the_general_encoder_encodes_it(kind: Kind, body: object) -> None:
    """A replier's answers take a shorter way (`encode_answer`); same frames, and the same error for what msgpack
    cannot encode, whose Packer is then fit for the next answer."""
    request = Envelope(b"request-id", Kind.REQUEST, "svc", {"q": 1}, attempt=2, created_at=1.5, deadline=9.0)
    packer = msgpack.Packer()

    def outcome(encode):  # noqa: ANN001, ANN202 - a test helper over both encoders
        try:
            return encode()
        except EncodeError as exc:
            return str(exc)

    short = outcome(lambda: codec.encode_answer(packer.pack, kind, b"answer-id", request, body, 3.25))
    general = outcome(lambda: codec.encode_fields(msgpack.Packer().pack, kind, b"answer-id", "svc", b"request-id", None,
                                                  2, 3.25, None, {}, None, body))
    assert short == general
    if isinstance(short, str):
        assert type(body).__name__ in short
        assert codec.encode_answer(packer.pack, kind, b"next", request, "ok", 4.0) == codec.encode_fields(
            msgpack.Packer().pack, kind, b"next", "svc", b"request-id", None, 2, 4.0, None, {}, None, "ok")
    else:
        answer = codec.decode(short)
        assert (answer.kind, answer.correlation_id, answer.topic, answer.attempt) == (kind, b"request-id", "svc", 2)


def test_unencodable_body_raises_encode_error_naming_the_type() -> None:
    with pytest.raises(EncodeError, match="object"):
        codec.encode(sample(body=object()))


def header(**overrides: object) -> bytes:
    fields = [1, 0, b"id-bytes", "t", None, None, 1, 1.0, None, {}, None, 0]
    names = ["version", "kind", "id", "topic", "corr", "reply_to", "attempt", "created", "deadline", "headers", "seq", "fmt"]
    for k, v in overrides.items():
        fields[names.index(k)] = v
    return msgpack.packb(fields)


BODY = msgpack.packb({"ok": True})


def message(body: object = None, **overrides: object) -> bytes:
    """A one-frame message: the header array with `body` appended."""
    return b"\x9d" + header(**overrides)[1:] + msgpack.packb(body)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"\xc1garbage", BODY], "not valid msgpack"),
        ([header()[:5], BODY], "not valid msgpack"),
        ([header()], "at least 13 elements"),
        ([header(), BODY, b"extra"], "expected 1 frame"),
        ([], "expected 1 frame"),
        ([b"\xc1"], "message is not valid msgpack"),
        ([msgpack.packb("text")], "at least 13 elements"),
        ([message(fmt=1)], "raw body must be bytes"),
        ([message(version=2)], "unknown envelope version 2"),
        ([message(headers={1: "x"})], "header keys must be strings"),
        ([message(msgpack.ExtType(5, b"xx"))], "extension type 5"),
        ([header(version=2), BODY], "unknown envelope version 2"),
        ([header(kind=9), BODY], "unknown kind"),
        ([header(id=""), BODY], "id must be"),
        ([header(attempt=0), BODY], "attempt must be a positive integer"),
        ([header(headers=[1]), BODY], "headers must be a map"),
        ([header(fmt=7), BODY], "unknown body format"),
        ([header(), b"\xc1"], "body is not valid msgpack"),
        ([msgpack.packb({"a": 1}), BODY], "array"),
        ([msgpack.packb([1, 2]), BODY], "array"),
        ([header(), msgpack.packb(msgpack.ExtType(5, b"xx"))], "extension type 5"),
    ],
)
def test_bad_frames_raise_the_one_decode_error_with_the_raw_frames(frames: list[bytes], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        codec.decode(frames)
    assert info.value.frames == frames


def test_published_topic_frame_must_match_the_header() -> None:
    frames = codec.encode_published(sample(kind=Kind.MESSAGE))
    with pytest.raises(DecodeError, match="topic frame"):
        codec.decode_published([b"other", *frames[1:]])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_random_frames_never_raise_anything_but_decode_error(frames: list[bytes]) -> None:
    try:
        codec.decode(frames)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_frames_decode_or_raise_decode_error(data: st.DataObject) -> None:
    env = sample(body=data.draw(st.sampled_from([{"sku": "A-1", 7: [1.5]}, b"raw", b"r" * codec.INLINE_MAX])))
    frames = [bytearray(f) for f in codec.encode(env)]
    which = data.draw(st.integers(0, len(frames) - 1))
    if frames[which]:
        pos = data.draw(st.integers(0, len(frames[which]) - 1))
        frames[which][pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frames[which])))
    frames[which] = frames[which][:cut]
    try:
        env = codec.decode([bytes(f) for f in frames])
    except DecodeError:
        return
    assert isinstance(env, Envelope)


_BODIES = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                       max_leaves=8)


def _a_reply(topic: str, body: object, *, kind: Kind = Kind.REPLY, attempt: int = 1,
             replier: IdSource | None = None) -> tuple[codec.Stamp, bytes, bytes]:
    """(the requester's stamp, its request's id, the message a zfabric replier answers that request with)."""
    stamp = codec.Stamp(IdSource(), topic, Kind.REQUEST)
    request, _ = stamp.plain("question", 1.0, None, 31.0)
    answer = codec.encode_answer(msgpack.Packer().pack, kind, (replier or IdSource()).next(),
                                 request.with_attempt(attempt), body, 2.5)
    assert len(answer) == 1
    return stamp, request.id, answer[0]


@settings(max_examples=200, deadline=None)
@given(topic=st.text(max_size=40), body=_BODIES.filter(lambda b: not isinstance(b, bytes)))  # bytes: a raw body
def test_the_reply_reader_reads_a_repliers_reply_as_the_general_decoder_does(topic: str, body: object) -> None:
    stamp, rid, message = _a_reply(topic, body)
    got = stamp.reply_body(message, rid)
    assert got is not codec.NOT_A_REPLY
    assert msgpack.packb(got) == msgpack.packb(codec.decode_message(message).body)  # (NaN != NaN: compare bytes)
    assert msgpack.packb(stamp.reply_body(memoryview(message), rid)) == msgpack.packb(got)  # a large reply, in place


@pytest.mark.parametrize("other", ["error", "second attempt", "another request", "a longer replier id", "headers",
                                   "raw bytes"])
def test_the_reply_reader_leaves_every_other_reply_to_the_general_decoder(other: str) -> None:
    stamp, rid, message = _a_reply("svc", b"raw" if other == "raw bytes" else {"ok": 1}, kind=Kind.ERROR if other == "error" else Kind.REPLY,
                                   attempt=2 if other == "second attempt" else 1,
                                   replier=IdSource(b"o" * 9) if other == "a longer replier id" else None)
    if other == "another request":
        rid = rid[:-1] + bytes([rid[-1] ^ 1])
    if other == "headers":
        env = codec.decode_message(message)
        message = codec.encode(env.replace(headers={"h": 1}))[0]
    assert stamp.reply_body(message, rid) is codec.NOT_A_REPLY


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_the_reply_reader_never_reads_what_the_general_decoder_would_not(data: st.DataObject) -> None:
    """Whatever a mutated reply becomes, the short reader reads it only as the general decoder reads it: a REPLY to
    this request's first attempt, with the same body."""
    stamp, rid, valid = _a_reply(data.draw(st.sampled_from(["", "svc"])), data.draw(st.sampled_from(
        [{"sku": "A-1", "n": [1.5]}, "text", None])))
    message = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(message) - 1))
        message[pos] = data.draw(st.integers(0, 255))
    message = message[:data.draw(st.integers(0, len(message)))] + data.draw(st.binary(max_size=3))
    got = stamp.reply_body(bytes(message), rid)
    if got is codec.NOT_A_REPLY:
        return
    env = codec.decode_message(bytes(message))  # must not raise
    assert (env.kind, env.correlation_id, env.attempt, env.headers) == (Kind.REPLY, rid, 1, {})
    assert msgpack.packb(got) == msgpack.packb(env.body)


def test_extension_types_are_refused_but_a_timestamp_arrives_as_msgpacks_own() -> None:
    with pytest.raises(DecodeError, match="extension type 5 is not allowed"):
        codec.decode(codec.encode(sample(body={"x": msgpack.ExtType(5, b"x")})))
    env = sample(body={"at": msgpack.Timestamp(1_795_827_227, 83_234_000)})
    assert codec.decode(codec.encode(env)).body == env.body
    assert codec.decode(codec.encode_split(env)).body == env.body


def test_a_header_claiming_a_4_gib_string_is_rejected_without_allocating() -> None:
    huge = b"\x9c" + b"\x01\x00" + b"\xdb\xff\xff\xff\xff" + b"x" * 10
    with pytest.raises(DecodeError):
        codec.decode([huge, BODY])
    with pytest.raises(DecodeError):
        codec.decode([b"\x9d" + huge[1:]])


def test_default_and_read_only_headers_encode() -> None:
    from types import MappingProxyType

    env = Envelope.new({"x": 1})
    assert codec.decode(codec.encode(env)).headers == {}
    ro = env.replace(headers=MappingProxyType({"k": "v"}))
    assert codec.decode(codec.encode(ro)).headers == {"k": "v"}


def test_batches_keep_the_order_and_send_large_bodies_alone() -> None:
    small = [(n, [b"s%d" % n]) for n in range(5)]
    large = (99, [b"header", b"large body"])
    grouped = list(codec.group_batches([*small[:3], large, *small[3:]], per=2, max_bytes=1 << 20))
    assert [items for items, _ in grouped] == [[0, 1], [2], [99], [3, 4]]
    assert grouped[1][1] == [b"s2"] and grouped[2][1] == [b"header", b"large body"]  # alone: not a batch
    assert codec.is_batch(grouped[0][1]) and codec.is_batch(grouped[3][1])
    by_bytes = list(codec.group_batches(small, per=100, max_bytes=4))
    assert [items for items, _ in by_bytes] == [[0, 1], [2, 3], [4]]
