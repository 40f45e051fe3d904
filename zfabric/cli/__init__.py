"""The `zfabric` command: a thin layer over the library, one module per noun."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import (
    bench,
    dlq,
    forwarder,
    keys,
    pubsub,
    queue,
    reqrep,
    scatter,
    sidecar,
    topology,
)
from ._common import fabric_errors

app = typer.Typer(
    name="zfabric",
    help="A brokerless messaging fabric on ZeroMQ: queues, reliable queues, pub/sub, request-reply, scatter-gather.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"zfabric {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    log_level: Annotated[str, typer.Option(envvar="ZFABRIC_LOG_LEVEL", help="debug, info, warning or error (logs go to stderr).")] = "warning",
) -> None:
    """A brokerless messaging fabric on ZeroMQ."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}; use debug, info, warning or error", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def demo(
    topology: Annotated[Path | None, typer.Option(help="Instead: start this topology's infrastructure and push "
                                                     "traffic through every queue, topic, service and group it declares.")] = None,
) -> None:
    """Run every pattern live on loopback and print a short report of each (exit 1 if one fails).

    Example:  zfabric demo
              zfabric demo --topology topologies/shop.yaml
    """
    if topology is not None:
        from ..topology.exercise import run_topology_demo

        ok = fabric_errors(run_topology_demo)(topology)
    else:
        from ..demo import run_demo

        ok = run_demo()
    if not ok:
        raise typer.Exit(1)


app.command()(forwarder.forwarder)
app.command()(pubsub.pub)
app.command()(pubsub.sub)
app.command()(queue.push)
app.command()(queue.pull)
app.command()(reqrep.request)
app.command()(reqrep.echo)
app.command()(scatter.scatter)
app.command()(bench.bench)
app.command()(topology.validate)
app.command()(topology.up)
app.command()(topology.status)
app.command()(topology.graph)
app.add_typer(sidecar.app, name="sidecar")
app.add_typer(dlq.app, name="dlq")
app.add_typer(keys.app, name="keys")


def main() -> None:
    """Console-script entry point."""
    app()
