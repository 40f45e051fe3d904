"""Counter sets every pattern keeps; plain ints on the hot path, a dict for display."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CounterSet:
    """Base of every counters dataclass: `snapshot()` for printing, JSON and status tools."""

    def snapshot(self) -> dict[str, int]:
        """A plain dict copy."""
        return asdict(self)


@dataclass
class Counters(CounterSet):
    """Counters every socket owner keeps; patterns add their own fields."""

    sent: int = 0
    received: int = 0
    decode_errors: int = 0
