"""What one sidecar runs with: where it listens, where it stores, which queues with which policies."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..options import check_keys
from .policy import DEFAULT_POLICY, RetryPolicy
from .store import SYNCHRONOUS

DEFAULT_SIDECAR_ENDPOINT = "tcp://127.0.0.1:5580"
"""Where a sidecar listens for producers, workers and control clients by default."""


def _policies(queues: Mapping[str, Any] | Sequence[str]) -> dict[str, RetryPolicy]:
    if isinstance(queues, str):
        queues = [queues]
    if not isinstance(queues, Mapping):
        return {str(q): DEFAULT_POLICY for q in queues}
    out: dict[str, RetryPolicy] = {}
    for name, policy in queues.items():
        if isinstance(policy, RetryPolicy):
            out[name] = policy
        elif policy is None:
            out[name] = DEFAULT_POLICY
        elif isinstance(policy, Mapping):
            out[name] = RetryPolicy.from_mapping(policy, where=f"queues.{name}")
        else:
            raise ConfigError(f"queues.{name}: expected a retry policy mapping, got {type(policy).__name__}")
    return out


@dataclass(frozen=True)
class SidecarConfig:
    """A sidecar's settings; defaults in one place, validated on construction."""

    store: Path | str
    """The SQLite file (created if missing; its directory must exist)."""
    queues: Mapping[str, Any] | Sequence[str] = field(default_factory=dict)
    """The queues this sidecar owns, each with its retry policy."""
    endpoint: str = DEFAULT_SIDECAR_ENDPOINT
    """Bind address for producers, workers and control clients (port 0: any free port)."""
    lease_timeout: float = 3.0
    """A worker silent this long (no heartbeat) loses its messages to other workers."""
    dedupe_window: float = 600.0
    """Seconds an acknowledged message's id is remembered, so a late resend is not stored twice."""
    synchronous: str = "full"
    """SQLite synchronous level: "full" survives power loss, "normal" only process crashes (faster)."""
    cache_limit: int = 10_000
    """Ready messages held in memory per queue; a larger backlog waits in the store and is paged in."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "queues", _policies(self.queues))
        if not self.queues:
            raise ConfigError("sidecar: declare at least one queue")
        for name in self.queues:
            if not isinstance(name, str) or not name or name.startswith("\x00"):
                raise ConfigError(f"queues: {name!r} is not a valid queue name")
        for name in ("lease_timeout", "dedupe_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"sidecar.{name}: expected a positive number of seconds, got {value!r}")
        if self.synchronous not in SYNCHRONOUS:
            raise ConfigError(f"sidecar.synchronous: expected one of {', '.join(SYNCHRONOUS)}, got {self.synchronous!r}")
        if type(self.cache_limit) is not int or self.cache_limit < 2:
            raise ConfigError(f"sidecar.cache_limit: expected an integer >= 2, got {self.cache_limit!r}")

    @property
    def policies(self) -> Mapping[str, RetryPolicy]:
        """The queues with their policies (after validation every value is a RetryPolicy)."""
        return self.queues  # type: ignore[return-value]

    def replace(self, **changes: Any) -> SidecarConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "sidecar") -> SidecarConfig:
        """A config from plain values (a parsed file); unknown keys get a "did you mean"."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        try:
            check_keys(data, [f.name for f in dataclasses.fields(cls)])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if "store" not in data:
            raise ConfigError(f"{where}: missing key 'store' (the SQLite file)")
        try:
            return cls(**dict(data))
        except (TypeError, ConfigError) as exc:
            text = str(exc)
            for prefix in ("sidecar: ", "sidecar."):
                if text.startswith(prefix):
                    text = text[len(prefix):]
            raise ConfigError(f"{where}: {text}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SidecarConfig:
        """A config from a YAML file: the keys of this class; `queues` maps names to policies."""
        from .._yaml import load_file

        p = Path(path)
        data = load_file(p, what="sidecar config").data
        store = data.get("store") if isinstance(data, dict) else None
        if isinstance(store, str) and not os.path.isabs(store):
            data["store"] = str(p.parent / store)
        try:
            return cls.from_mapping(data, where=str(p))
        except ConfigError as exc:
            raise ConfigError(str(exc) if str(exc).startswith(str(p)) else f"{p}: {exc}") from None
