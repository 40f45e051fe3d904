"""Endpoint parsing: tcp://, ipc:// and inproc:// addresses, and whether a socket binds or connects.

A leading `@` means bind and `>` means connect (the CZMQ convention), so one string can say
both: `@tcp://127.0.0.1:5555`. Without a prefix the caller's default applies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError

TRANSPORTS = ("tcp", "ipc", "inproc")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A validated ZeroMQ address and the side (bind or connect) this socket takes."""

    address: str
    bind: bool

    @classmethod
    def parse(cls, text: str | Endpoint, *, bind: bool | None = None, default_bind: bool = False) -> Endpoint:
        """Parse `text`; an explicit `bind` wins over an `@`/`>` prefix, which wins over `default_bind`."""
        if isinstance(text, Endpoint):
            return text if bind is None else cls(text.address, bind)
        if not isinstance(text, str):
            raise ConfigError(f"endpoint must be a string like 'tcp://127.0.0.1:5555', got {type(text).__name__}")
        raw = text.strip()
        side = default_bind
        if raw[:1] == "@":
            side, raw = True, raw[1:]
        elif raw[:1] == ">":
            side, raw = False, raw[1:]
        if bind is not None:
            side = bind
        _validate(raw, text)
        return cls(raw, side)

    @property
    def transport(self) -> str:
        """`tcp`, `ipc` or `inproc`."""
        return self.address.split("://", 1)[0]

    @property
    def is_loopback(self) -> bool:
        """True for ipc, inproc, and tcp on a loopback host (no network exposure)."""
        parts = tcp_host_port(self.address)
        if parts is None:
            return True
        host = parts[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return ("@" if self.bind else ">") + self.address


def tcp_host_port(address: str) -> tuple[str, str] | None:
    """(host without IPv6 brackets, port) of a tcp:// address; None for other transports."""
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://"):].rpartition(":")
    return host.strip("[]"), port


def _validate(address: str, original: str) -> None:
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in TRANSPORTS:
        raise ConfigError(
            f"endpoint {original!r}: expected one of {', '.join(t + '://' for t in TRANSPORTS)} followed by an address"
        )
    if not rest:
        raise ConfigError(f"endpoint {original!r}: the address after {scheme}:// is empty")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(f"endpoint {original!r}: tcp needs host:port, e.g. tcp://127.0.0.1:5555")
        if port != "*" and not (port.isdigit() and 0 <= int(port) <= 65535):
            raise ConfigError(f"endpoint {original!r}: port must be 0-65535 or '*', got {port!r}")


EndpointArg = str | Endpoint | Sequence[str | Endpoint]
"""One address or several, as strings or parsed Endpoints."""


def parse_many(texts: EndpointArg, *, bind: bool | None, default_bind: bool) -> list[Endpoint]:
    """Parse one endpoint or a list of them with the same defaults; at least one is required."""
    items = [texts] if isinstance(texts, (str, Endpoint)) else list(texts)
    if not items:
        raise ConfigError("at least one endpoint is required")
    return [Endpoint.parse(t, bind=bind, default_bind=default_bind) for t in items]
