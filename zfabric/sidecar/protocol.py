"""The sidecar's wire protocol: one command frame, then its arguments (docs/reliability.md draws it).

Every message to or from a sidecar is `[command, argument]` after the ROUTER routing id,
the argument one msgpack frame. Envelopes travel in the codec's split form (header and body
as two byte strings, codec.encode_split), many to a PUT or DLV frame, so a batch of 100
costs one ZeroMQ frame, not 200. Parsing is strict and raises DecodeError, so the sidecar
can count and skip anything foreign. The older layout, one ZeroMQ frame per header, body and
attempt, is still read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import DecodeError

PUT = b"PUT"
"""producer -> sidecar: PUT [header, body, header, body, ...]; store these, then confirm."""
CONFIRM = b"OK"
"""sidecar -> producer: OK [id, ...]; each id is durably stored (or was already)."""
REJECT = b"REJ"
"""sidecar -> producer: REJ [[id, reason], ...]; these will never be stored."""
READY = b"RDY"
"""worker -> sidecar: RDY {worker, name, queue, window, dlv}; deliver me up to `window` unacked messages
(`dlv: "packed"`: in the packed DLV layout)."""
HEARTBEAT = b"HB"
"""worker -> sidecar: HB {worker}; I am alive (keeps the lease)."""
BYE = b"BYE"
"""worker -> sidecar: BYE {worker}; I am stopping: give what I hold to other workers now."""
WHO = b"WHO"
"""sidecar -> worker: WHO; I do not know you (I restarted, or your lease expired): send RDY again."""
DELIVER = b"DLV"
"""sidecar -> worker: DLV [attempt, header, body, attempt, header, body, ...]; `attempt` is the
count that replaces the header's (the stored header stays as the producer sent it). A worker
gets this packed layout when its RDY says `dlv: "packed"`; else a frame per attempt (4 bytes,
big-endian), header and body, the layout of the first release."""
DLV_PACKED = "packed"
ACK = b"ACK"
"""worker -> sidecar: ACK {worker, acks: [[id, attempt], ...]}; handled, forget them."""
NACK = b"NAK"
"""worker -> sidecar: NAK {worker, id, attempt, error_type, error, traceback, retry_after, retryable}."""
CONTROL = b"CTL"
"""client -> sidecar: CTL {op, ...}; stats and dead-letter operations."""
CONTROL_REPLY = b"CTR"
"""sidecar -> client: CTR result."""
CONTROL_ERROR = b"CTE"
"""sidecar -> client: CTE message; the operation failed and changed nothing."""

MAX_CONTROL_FRAME = 1 << 20
"""A control frame larger than this (1 MiB) is refused before it is unpacked."""
BATCH_BYTES = 4 << 20
"""A PUT or DLV frame being built is closed once it holds this many bytes of envelopes (with at least
one), so a batch of large messages stays far below the socket's max_message_size (64 MiB)."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def pack(value: Any) -> bytes:
    """One msgpack frame."""
    return msgpack.packb(value)


def unpack(frame: bytes, what: str) -> Any:
    """A msgpack frame of at most MAX_CONTROL_FRAME bytes; DecodeError names `what` was wrong."""
    if len(frame) > MAX_CONTROL_FRAME:
        raise DecodeError(f"{what}: frame of {len(frame)} bytes exceeds {MAX_CONTROL_FRAME}", [frame[:64]])
    try:
        return msgpack.unpackb(frame, raw=False, ext_hook=_refuse_ext, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for hostile input
        raise DecodeError(f"{what}: not valid msgpack: {exc}", [frame[:64]]) from None


def unpack_map(frames: Sequence[bytes], what: str, required: Sequence[str] = ()) -> dict[str, Any]:
    """The single msgpack map argument of a command, with `required` keys present."""
    if len(frames) != 2:
        raise DecodeError(f"{what}: expected 2 frames, got {len(frames)}", frames)
    value = unpack(frames[1], what)
    if type(value) is not dict:
        raise DecodeError(f"{what}: argument must be a map", frames)
    missing = [k for k in required if k not in value]
    if missing:
        raise DecodeError(f"{what}: missing {', '.join(missing)}", frames)
    return value


def attempt_frame(attempt: int) -> bytes:
    """An attempt in the older DLV layout: 4 bytes, big-endian."""
    return attempt.to_bytes(4, "big")


def _unpack_items(frame: bytes, what: str) -> list[Any]:
    """The array of a PUT or DLV frame (bounded by the socket's max_message_size, not MAX_CONTROL_FRAME)."""
    try:
        value = msgpack.unpackb(frame, raw=False, ext_hook=_refuse_ext, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for hostile input
        raise DecodeError(f"{what}: not valid msgpack: {exc}", [frame[:64]]) from None
    if type(value) is not list:
        raise DecodeError(f"{what}: argument must be an array", [frame[:64]])
    return value


def split_puts(frames: Sequence[bytes]) -> list[bytes]:
    """[header, body, header, body, ...] from a PUT message (without its command frame)."""
    if len(frames) == 1:
        items = _unpack_items(frames[0], "PUT")
        if not items or len(items) % 2 or any(type(i) is not bytes for i in items):
            raise DecodeError("PUT: expected header/body byte string pairs", [frames[0][:64]])
        return items
    if not frames or len(frames) % 2:  # the older layout: a ZeroMQ frame for each header and body
        raise DecodeError("PUT: expected header/body pairs", frames)
    return list(frames)


def split_deliveries(frames: Sequence[bytes]) -> list[tuple[int, bytes, bytes]]:
    """[(attempt, header, body), ...] from a DLV message (without its command frame)."""
    if len(frames) == 1:
        items = _unpack_items(frames[0], "DLV")
        if not items or len(items) % 3:
            raise DecodeError("DLV: expected attempt/header/body triples", [frames[0][:64]])
        out = list(zip(items[::3], items[1::3], items[2::3]))
        if any(type(a) is not int or a < 1 or type(h) is not bytes or type(b) is not bytes for a, h, b in out):
            raise DecodeError("DLV: each delivery must be a positive attempt, a header and a body", [frames[0][:64]])
        return out
    if not frames or len(frames) % 3:  # the older layout: a ZeroMQ frame for each attempt, header and body
        raise DecodeError("DLV: expected attempt/header/body triples", frames)
    triples = []
    for i in range(0, len(frames), 3):
        if len(frames[i]) != 4:
            raise DecodeError("DLV: attempt frame must be 4 bytes", frames)
        triples.append((int.from_bytes(frames[i], "big"), frames[i + 1], frames[i + 2]))
    return triples


def unpack_acks(value: Any, what: str = "ACK") -> list[tuple[bytes, int]]:
    """[(id, attempt), ...] from an ACK's `acks`, checked element by element."""
    if type(value) is not list:
        raise DecodeError(f"{what}: acks must be a list", [])
    out: list[tuple[bytes, int]] = []
    for item in value:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not bytes or type(item[1]) is not int:
            raise DecodeError(f"{what}: each ack must be [id, attempt]", [])
        out.append((item[0], item[1]))
    return out
