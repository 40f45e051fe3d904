"""`zfabric scatter`: ask every member of a group and show who answered what."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import ConfigError
from ._common import dumps, fabric_errors, parse_payload


def _members(specs: list[str]) -> dict[str, str]:
    members = {}
    for spec in specs:
        name, sep, endpoint = spec.partition("=")
        if not sep or not name or not endpoint:
            raise ConfigError(f"--member {spec!r}: expected NAME=ENDPOINT, e.g. pricing-a=tcp://127.0.0.1:5581")
        members[name] = endpoint
    return members


@fabric_errors
def scatter(
    payload: Annotated[str, typer.Argument(help="JSON payload sent to every member.")],
    member: Annotated[list[str], typer.Option(help="A member as NAME=ENDPOINT; repeat for each one.")],
    deadline: Annotated[float, typer.Option(help="Seconds to gather replies.")] = 1.0,
    quorum: Annotated[int | None, typer.Option(help="Return as soon as this many members answered.")] = None,
    text: Annotated[bool, typer.Option(help="Send the payload as a string instead of parsing JSON.")] = False,
) -> None:
    """Send one request to every member; print the gathered result as JSON.

    Example:  zfabric scatter '{"sku": "A-1"}' --member a=tcp://127.0.0.1:5581 --member b=tcp://127.0.0.1:5582 --quorum 1
    """
    from ..patterns.scatter import Scatterer

    body = parse_payload(payload, as_text=text)
    with Scatterer(_members(member), deadline=deadline, quorum=quorum) as scatterer:
        result = scatterer.scatter(body)
    typer.echo(dumps({
        "answered": result.answered,
        "replies": {r.member: r.body for r in result.replies},
        "errors": {m: str(e) for m, e in result.errors.items()},
        "missing": result.missing_reasons,
        "elapsed_ms": round(result.elapsed * 1000, 2),
    }))
