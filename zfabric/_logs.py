"""Throttled warnings: a hostile or broken peer must not flood the log."""

from __future__ import annotations

import logging
import time


class Throttled:
    """Logs a warning at most once per `interval` seconds per key, and says how many it held back."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log `message` under `key` unless one was logged for `key` within the interval."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        if len(self._last) > 10_000:
            self._last.clear()
            self._held.clear()
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} similar message(s) suppressed)" if held else ""
        self._log.warning(message + suffix, *args)
