"""The sidecar's wire protocol: one command frame, then its arguments (docs/reliability.md draws it).

Every message to or from a sidecar is `[command, ...]` after the ROUTER routing id.
Messages travel in the codec's split form `[header, body]` (codec.encode_split); everything
else is one small msgpack frame. Parsing is strict and raises DecodeError, so the
sidecar can count and skip anything foreign.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import DecodeError

PUT = b"PUT"
"""producer -> sidecar: PUT header body [header body ...]; store these, then confirm."""
CONFIRM = b"OK"
"""sidecar -> producer: OK [id, ...]; each id is durably stored (or was already)."""
REJECT = b"REJ"
"""sidecar -> producer: REJ [[id, reason], ...]; these will never be stored."""
READY = b"RDY"
"""worker -> sidecar: RDY {worker, name, queue, window}; deliver me up to `window` unacked messages."""
HEARTBEAT = b"HB"
"""worker -> sidecar: HB {worker}; I am alive (keeps the lease)."""
BYE = b"BYE"
"""worker -> sidecar: BYE {worker}; I am stopping: give what I hold to other workers now."""
WHO = b"WHO"
"""sidecar -> worker: WHO; I do not know you (I restarted, or your lease expired): send RDY again."""
DELIVER = b"DLV"
"""sidecar -> worker: DLV attempt header body [attempt header body ...]; `attempt` is a 4-byte
big-endian count that replaces the header's (the stored header stays as the producer sent it)."""
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
    return attempt.to_bytes(4, "big")


def split_deliveries(frames: Sequence[bytes]) -> list[tuple[int, bytes, bytes]]:
    """[(attempt, header, body), ...] from a DLV message (without its command frame)."""
    if not frames or len(frames) % 3:
        raise DecodeError("DLV: expected attempt/header/body triples", frames)
    out = []
    for i in range(0, len(frames), 3):
        if len(frames[i]) != 4:
            raise DecodeError("DLV: attempt frame must be 4 bytes", frames)
        out.append((int.from_bytes(frames[i], "big"), frames[i + 1], frames[i + 2]))
    return out


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
