"""Retry policy: how many attempts, how long to wait between them, how long a message may live. Pure."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..options import check_keys


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Per-queue retry rules; frozen and validated, so code and config files build the same thing.

    The delay before retry n (n = attempts made so far) is `min(cap, base * 2**(n-1))`,
    of which the last `jitter` fraction is random, so failing messages do not come back
    in lockstep.
    """

    max_attempts: int = 5
    """Deliveries before a failing message is dead-lettered (the first delivery counts)."""
    backoff_base: float = 0.5
    """Seconds before the first retry (before jitter)."""
    backoff_cap: float = 60.0
    """Longest wait between two attempts, in seconds."""
    jitter: float = 0.5
    """Fraction of each delay that is random: 0 = exact, 1 = anywhere from 0 to the full delay."""
    ttl: float | None = None
    """Seconds a message may wait in the queue before it is dead-lettered as expired (None: forever)."""

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts: expected a positive integer, got {self.max_attempts!r}")
        for name in ("backoff_base", "backoff_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"RetryPolicy.{name}: expected a number of seconds >= 0, got {value!r}")
        if self.backoff_cap < self.backoff_base:
            raise ConfigError(f"RetryPolicy.backoff_cap ({self.backoff_cap}) must be >= backoff_base ({self.backoff_base})")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter <= 1:
            raise ConfigError(f"RetryPolicy.jitter: expected a fraction between 0 and 1, got {self.jitter!r}")
        if self.ttl is not None and (isinstance(self.ttl, bool) or not isinstance(self.ttl, (int, float)) or self.ttl <= 0):
            raise ConfigError(f"RetryPolicy.ttl: expected a positive number of seconds or null, got {self.ttl!r}")

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the next delivery of a message that has failed `attempts` times."""
        full = min(self.backoff_cap, self.backoff_base * 2.0 ** max(attempts - 1, 0))
        return full * (1.0 - self.jitter) + full * self.jitter * rand()

    def exhausted(self, attempts: int) -> bool:
        """True when `attempts` deliveries use up the budget."""
        return attempts >= self.max_attempts

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain values (for JSON, the CLI and config files)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "policy") -> RetryPolicy:
        """A policy from a config mapping; unknown keys are an error that names them and suggests the right one."""
        check_keys(data, [f.name for f in dataclasses.fields(cls)], where)
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            text = str(exc)
            raise ConfigError(f"{where}.{text[len('RetryPolicy.'):]}" if text.startswith("RetryPolicy.")
                              else f"{where}: {text}") from None


DEFAULT_POLICY = RetryPolicy()
