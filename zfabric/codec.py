"""Envelope <-> ZeroMQ frames, msgpack only (never pickle). The layout is docs/wire.md.

Point-to-point and request-reply messages are two frames, `[header, body]`; published
messages put the topic first, `[topic, header, body]`, so ZeroMQ's prefix matching works
at every hop. Every failure to decode raises `DecodeError` carrying the raw frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from .envelope import Envelope, Kind
from .errors import ConfigError, DecodeError, EncodeError

VERSION = 1
"""The envelope version this library writes and reads (header element 0)."""

BODY_MSGPACK = 0
BODY_RAW = 1
HEADER_FIELDS = 12
"""A v1 header has at least this many elements; later minor revisions may append more."""

CONTROL_PREFIX = b"\x00"
"""Topics starting with this byte are fabric control traffic, never user messages."""
PROBE_PREFIX = b"\x00zf?"
"""Subscribing to PROBE_PREFIX + nonce asks the forwarder to publish that topic back once."""
COUNT_PREFIX = b"\x00zf#"
"""Forwarder -> publishers: COUNT_PREFIX + prefix + NUL + decimal count, as a subscription."""


def count_entry(prefix: bytes, count: int) -> bytes:
    """The subscription topic a forwarder uses to tell publishers how many subscribe to `prefix`."""
    return COUNT_PREFIX + prefix + b"\x00" + str(count).encode()


def parse_count_entry(topic: bytes) -> tuple[bytes, int] | None:
    """(prefix, count) from a count-entry topic, or None if it is not a well-formed one."""
    prefix, sep, count = topic[len(COUNT_PREFIX) :].rpartition(b"\x00")
    if not sep or not count.isdigit():
        return None
    return prefix, int(count)


def validate_topic(topic: str) -> bytes:
    """The UTF-8 bytes of a user topic; ConfigError for a non-string or a reserved control topic."""
    if not isinstance(topic, str):
        raise ConfigError(f"topic must be a string, got {type(topic).__name__}")
    data = topic.encode()
    if data[:1] == CONTROL_PREFIX:
        raise ConfigError(f"topic {topic!r}: topics starting with NUL are reserved for fabric control traffic")
    return data

_KINDS = tuple(Kind)
_make_envelope = tuple.__new__  # every field was validated just above; skip NamedTuple's argument parsing
_RAW_TYPES = (bytes, bytearray, memoryview)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _unpack_header(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True)


def _unpack_body(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_refuse_ext, use_list=True)


def encode_body(body: Any) -> tuple[int, Any]:
    """(format, frame) for a body: raw bytes travel as they are, anything else as msgpack."""
    if isinstance(body, _RAW_TYPES):
        return BODY_RAW, body
    try:
        return BODY_MSGPACK, msgpack.packb(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"body of type {type(body).__name__} is not msgpack-serializable: {exc}") from exc


def encode_header(env: Envelope, body_format: int) -> bytes:
    """The msgpack header frame for `env` (every field but the body)."""
    try:
        return msgpack.packb(
            [
                VERSION,
                int(env.kind),
                env.id,
                env.topic,
                env.correlation_id,
                env.reply_to,
                env.attempt,
                env.created_at,
                env.deadline,
                env.headers if type(env.headers) is dict else dict(env.headers),
                env.seq,
                body_format,
            ]
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"envelope header is not msgpack-serializable (check headers): {exc}") from exc


def encode(env: Envelope) -> list[Any]:
    """`[header, body]` frames for a point-to-point or request-reply message."""
    fmt, body = encode_body(env.body)
    return [encode_header(env, fmt), body]


def encode_published(env: Envelope) -> list[Any]:
    """`[topic, header, body]` frames for a published message."""
    fmt, body = encode_body(env.body)
    return [env.topic.encode(), encode_header(env, fmt), body]


def decode(frames: Sequence[bytes]) -> Envelope:
    """The envelope in `[header, body]` frames; raises DecodeError for anything else."""
    if len(frames) != 2:
        raise DecodeError(f"expected 2 frames [header, body], got {len(frames)}", frames)
    return _decode(frames[0], frames[1], frames)


def decode_published(frames: Sequence[bytes]) -> Envelope:
    """The envelope in `[topic, header, body]` frames; the topic frame must match the header."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames [topic, header, body], got {len(frames)}", frames)
    env = _decode(frames[1], frames[2], frames)
    if env.topic.encode() != frames[0]:
        raise DecodeError("topic frame does not match the header's topic", frames)
    return env


def decode_header(header: bytes, frames: Sequence[bytes] | None = None) -> Envelope:
    """The envelope described by a header frame alone, with `body=None`; the body stays undecoded.

    A store-and-forward hop (the sidecar) checks and records a message this way without
    paying for, or depending on, the body's contents.
    """
    fields, _ = _check_header(header, frames if frames is not None else [header])
    return _make_envelope(Envelope, fields)


def _check_header(header: bytes, frames: Sequence[bytes]) -> tuple[tuple[Any, ...], Any]:
    """The validated envelope fields of a header (body None) and its body format."""
    try:
        h = _unpack_header(header)
    except Exception as exc:  # msgpack raises several unrelated types for hostile input
        raise DecodeError(f"header is not valid msgpack: {exc}", frames) from None
    return _validate(h, frames)


def _validate(h: Any, frames: Sequence[bytes]) -> tuple[tuple[Any, ...], Any]:
    if type(h) is not list or len(h) < HEADER_FIELDS:
        raise DecodeError(f"header must be an array of at least {HEADER_FIELDS} elements", frames)
    version, kind, id_, topic, corr, reply_to, attempt, created, deadline, headers, seq, fmt = h[:HEADER_FIELDS]
    if version != VERSION:
        raise DecodeError(f"unknown envelope version {version!r} (this library speaks {VERSION})", frames)
    if type(kind) is not int or not 0 <= kind < len(_KINDS):
        raise DecodeError(f"unknown kind {kind!r}", frames)
    if type(id_) is not bytes or not id_:
        raise DecodeError("id must be non-empty bytes", frames)
    if type(topic) is not str:
        raise DecodeError("topic must be a string", frames)
    if corr is not None and type(corr) is not bytes:
        raise DecodeError("correlation id must be bytes or nil", frames)
    if reply_to is not None and type(reply_to) is not str:
        raise DecodeError("reply_to must be a string or nil", frames)
    if type(attempt) is not int or attempt < 1:
        raise DecodeError(f"attempt must be a positive integer, got {attempt!r}", frames)
    if type(created) not in (float, int):
        raise DecodeError("created_at must be a number", frames)
    if deadline is not None and type(deadline) not in (float, int):
        raise DecodeError("deadline must be a number or nil", frames)
    if type(headers) is not dict:
        raise DecodeError("headers must be a map", frames)
    if seq is not None and (type(seq) is not int or seq < 0):
        raise DecodeError("seq must be a non-negative integer or nil", frames)
    if fmt != BODY_RAW and fmt != BODY_MSGPACK:
        raise DecodeError(f"unknown body format {fmt!r}", frames)
    return (id_, _KINDS[kind], topic, None, corr, reply_to, attempt, created, deadline, headers, seq), fmt


def _decode(header: bytes, body: bytes, frames: Sequence[bytes]) -> Envelope:
    fields, fmt = _check_header(header, frames)
    if fmt == BODY_RAW:
        value: Any = bytes(body)
    elif fmt == BODY_MSGPACK:
        try:
            value = _unpack_body(body)
        except Exception as exc:
            raise DecodeError(f"body is not valid msgpack: {exc}", frames) from None
    return _make_envelope(Envelope, (*fields[:3], value, *fields[4:]))


BATCH_MARK = 127
"""Header element 1 of a batch (where a single message has its kind); see docs/wire.md."""
BATCH_PREFIX = bytes([0x93, VERSION, BATCH_MARK])
"""A batch's first frame starts with these bytes: msgpack [version, 127, count]."""


def is_batch(frames: Sequence[bytes]) -> bool:
    """True when `frames` carry a batch of envelopes rather than one."""
    return len(frames) == 2 and frames[0][:3] == BATCH_PREFIX


def encode_batch(envs: Sequence[Envelope]) -> list[bytes]:
    """`[batch header, entries]`: many point-to-point envelopes in one ZeroMQ message.

    Each entry is a v1 header array with the body appended (msgpack bodies inline, raw
    bodies as bin), so the receiver decodes the whole batch in one msgpack call.
    """
    entries = []
    for env in envs:
        fmt, body = (BODY_RAW, bytes(env.body)) if isinstance(env.body, _RAW_TYPES) else (BODY_MSGPACK, env.body)
        entries.append([VERSION, int(env.kind), env.id, env.topic, env.correlation_id, env.reply_to, env.attempt,
                        env.created_at, env.deadline, env.headers if type(env.headers) is dict else dict(env.headers),
                        env.seq, fmt, body])
    try:
        payload = msgpack.packb(entries)
    except (TypeError, ValueError, OverflowError):
        for env in envs:  # name the culprit
            encode(env)
        raise
    return [msgpack.packb([VERSION, BATCH_MARK, len(entries)]), payload]


def decode_batch(frames: Sequence[bytes]) -> list[Envelope]:
    """The envelopes of a batch; DecodeError (nothing delivered) if any part of it is invalid."""
    if not is_batch(frames):
        raise DecodeError("not a batch", frames)
    try:
        head = _unpack_header(frames[0])
        entries = _unpack_body(frames[1])
    except Exception as exc:
        raise DecodeError(f"batch is not valid msgpack: {exc}", frames) from None
    if type(head) is not list or len(head) != 3 or type(entries) is not list or head[2] != len(entries):
        raise DecodeError("batch header does not match its entries", frames)
    out = []
    for entry in entries:
        if type(entry) is not list or len(entry) != HEADER_FIELDS + 1:
            raise DecodeError(f"batch entry must be an array of {HEADER_FIELDS + 1} elements", frames)
        fields, fmt = _validate(entry[:HEADER_FIELDS], frames)
        if any(type(k) is not str for k in fields[9]):
            raise DecodeError("header keys must be strings", frames)
        body = entry[HEADER_FIELDS]
        if fmt == BODY_RAW and type(body) is not bytes:
            raise DecodeError("raw body must be bytes", frames)
        out.append(_make_envelope(Envelope, (*fields[:3], body, *fields[4:])))
    return out
