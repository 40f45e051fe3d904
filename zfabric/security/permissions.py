"""What each client key may do beyond connecting: topics to publish and subscribe to, queues and services to use.

Rules are keyed by key name (the name of its public key file, which the authenticator
gives each connection as its `User-Id`); `"*"` holds the rules for every other allowed
key. Topic rules are prefixes, like ZeroMQ subscriptions: `sales` allows `sales.eu`. A
subscription is allowed when it is at least as narrow as an allowed prefix, so a
subscription to everything ("") needs the rule "". A name list may be `["*"]`: all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..options import check_keys


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or isinstance(value, Mapping) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of names or topic prefixes, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Rules:
    """One key's rights."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    """Request-reply services and scatter-gather groups."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "") -> Rules:
        """Rules from a config mapping; errors start with the key path (under `where`, if given)."""
        prefix = f"{where}." if where else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where or 'rules'}: expected a mapping with publish, subscribe, queues and services")
        check_keys(data, ["publish", "subscribe", "queues", "services"], where)
        return cls(**{k: _names(v, f"{prefix}{k}") for k, v in data.items()})


def _prefix_allowed(topic: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "*" or topic.startswith(p) for p in prefixes)


class Permissions:
    """Per-key rules; anything not granted is denied."""

    def __init__(self, rules: Mapping[str, Rules | Mapping[str, Any]], where: str = "permissions") -> None:
        self.rules: dict[str, Rules] = {}
        for name, rule in rules.items():
            self.rules[name] = rule if isinstance(rule, Rules) else Rules.from_mapping(rule, f"{where}.{name}")

    def _for(self, who: str | None) -> Rules | None:
        if who is None:
            return None
        return self.rules.get(who) or self.rules.get("*")

    def may_publish(self, who: str | None, topic: str) -> bool:
        rules = self._for(who)
        return rules is not None and _prefix_allowed(topic, rules.publish)

    def may_subscribe(self, who: str | None, prefix: str) -> bool:
        rules = self._for(who)
        return rules is not None and _prefix_allowed(prefix, rules.subscribe)

    def may_use_queue(self, who: str | None, queue: str) -> bool:
        rules = self._for(who)
        return rules is not None and ("*" in rules.queues or queue in rules.queues)

    def may_use_service(self, who: str | None, service: str) -> bool:
        rules = self._for(who)
        return rules is not None and ("*" in rules.services or service in rules.services)
