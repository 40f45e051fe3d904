"""What every CLI command shares: payload parsing, JSON output, error reporting."""

from __future__ import annotations

import base64
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from rich.console import Console

from ..envelope import Envelope
from ..errors import FabricError, FabricTimeout

err_console = Console(stderr=True, soft_wrap=True)
"""Soft wrap: an error line stays one line, whatever the terminal width (scripts grep it)."""
F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_TIMEOUT = 3


def fabric_errors(func: F) -> F:
    """Turn zfabric errors into one red line on stderr and an exit code; Ctrl-C exits quietly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FabricTimeout as exc:
            err_console.print(f"[red]timeout:[/red] {exc}")
            raise typer.Exit(EXIT_TIMEOUT) from None
        except FabricError as exc:
            err_console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_payload(text: str, *, as_text: bool, where: str = "payload") -> Any:
    """A JSON payload (or the text itself with --text); a clear error names what was wrong."""
    if as_text:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        err_console.print(f"[red]error:[/red] {where} is not valid JSON ({exc.msg} at column {exc.colno}): {text[:80]!r}"
                          "\n  quote JSON for the shell, e.g. '{\"id\": 1}', or pass --text to send it as a string")
        raise typer.Exit(2) from None


def payloads(payload: str | None, *, as_text: bool) -> Iterator[Any]:
    """The payload argument, or one payload per non-empty stdin line when it is absent or '-'."""
    if payload is not None and payload != "-":
        yield parse_payload(payload, as_text=as_text)
        return
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if line.strip():
            yield parse_payload(line, as_text=as_text, where=f"stdin line {n}")


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    return repr(value)


def dumps(value: Any) -> str:
    """One line of JSON; bytes appear as {"$base64": ...}."""
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def show(env: Envelope, *, envelope: bool, with_topic: bool = False) -> None:
    """Print one received message: its body, `topic body` for pub/sub, or the whole envelope."""
    if envelope:
        line = dumps(env.to_dict())
    elif with_topic:
        line = f"{env.topic} {dumps(env.body)}"
    else:
        line = dumps(env.body)
    typer.echo(line)


class RateView:
    """Per-second rates of growing counters between two looks."""

    def __init__(self) -> None:
        import time

        self._clock = time.monotonic
        self._last: dict[str, int] = {}
        self._at = self._clock()

    def rates(self, current: dict[str, int]) -> dict[str, float]:
        now = self._clock()
        span = max(now - self._at, 1e-6)
        out = {k: (v - self._last.get(k, v)) / span for k, v in current.items()}
        self._last, self._at = dict(current), now
        return out


def topology_part(path: Any, kind: str, name: str | None) -> tuple[Any, str]:
    """The Fabric of a topology file and the name of its `kind` part to run (the only one when `name` is None)."""
    from ..errors import ConfigError
    from ..topology.fabric import Fabric

    fabric = Fabric.from_topology(path)
    table = getattr(fabric.topology, kind + "s")
    if name is None:
        if len(table) != 1:
            raise ConfigError(f"{path} declares {len(table)} {kind}s ({', '.join(table) or 'none'}); choose one with --name")
        name = next(iter(table))
    return fabric, name


def sidecar_client(topology: Any, name: str | None, timeout: float = 5.0) -> Any:
    """A SidecarClient for a topology's sidecar: its address and, when the fabric uses CURVE, this tool's key
    ($ZFABRIC_IDENTITY) and the sidecar's public key."""
    from ..sidecar.client import SidecarClient

    fabric, name = topology_part(topology, "sidecar", name)
    config = fabric.topology.sidecars[name]
    options = fabric.client_options(("sidecars", name))
    return SidecarClient(config.endpoint, timeout=timeout, options=options)
