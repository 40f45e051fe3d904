"""`zfabric validate | up | status | graph`: check, run, watch and draw a topology file."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError, TopologyError
from ._common import EXIT_ERROR, err_console, fabric_errors

if TYPE_CHECKING:
    from ..topology.model import Topology

TopologyFile = Annotated[Path, typer.Argument(help="A topology YAML file (see docs/topologies.md).")]


def _summary(t: Topology) -> str:
    parts = [(len(t.forwarders), "forwarder"), (len(t.topics), "topic"), (len(t.queues), "queue"),
             (len(t.sidecars), "sidecar"), (len(t.services), "service"), (len(t.groups), "group")]
    return ", ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in parts)


def validate(
    files: Annotated[list[Path], typer.Argument(help="One or more topology files.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only problems.")] = False,
) -> None:
    """Check topology files: syntax, every key and value, and the wiring between parts.

    Exit code 0 only when every file is valid; each problem names its key path, file and line.

    Example:  zfabric validate topologies/*.yaml
    """
    from ..topology.load import load_topology

    bad = 0
    for path in files:
        try:
            topology = load_topology(path)
        except TopologyError as exc:
            bad += 1
            n = len(exc.problems)
            err_console.print(Text.assemble(("invalid: ", "red"), f"{path}: {n} problem{'s' if n != 1 else ''}"))
            for problem in exc.problems:
                err_console.print(f"  {problem}", markup=False)
        except ConfigError as exc:
            bad += 1
            err_console.print(Text.assemble(("invalid: ", "red"), str(exc)))
        else:
            if not quiet:
                typer.echo(f"ok: {path}: topology {topology.name!r}, {_summary(topology)}")
    if bad:
        raise typer.Exit(EXIT_ERROR)


def _age(since: float | None) -> str:
    if since is None:
        return ""
    seconds = int(time.time() - since)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


_STATE_STYLE = {"running": "green", "restarting": "yellow", "starting": "cyan", "failed": "red", "stopped": "dim"}


def status_table(report: dict[str, Any]) -> Table:
    """The components of a `zfabric up` report as a rich table."""
    table = Table(title=f"topology {report['topology']}  (zfabric up pid {report['pid']}, {report['file']})")
    for column in ("component", "state", "pid", "address", "messages in", "messages out", "restarts", "up"):
        table.add_column(column, justify="right" if column.startswith(("messages", "restarts", "pid")) else "left")
    for c in report["components"]:
        state = c["state"]
        if state == "restarting" and c.get("last_exit") is not None:
            state += f" (exit {c['last_exit']})"
        table.add_row(f"{c['kind']} {c['name']}", f"[{_STATE_STYLE.get(c['state'], 'white')}]{state}[/]",
                      str(c["pid"] or ""), c["address"], f"{c['messages_in']:,}", f"{c['messages_out']:,}",
                      str(c["restarts"]), _age(c["started_at"]) if c["state"] == "running" else "")
    return table


@fabric_errors
def up(
    file: TopologyFile,
    host: Annotated[str | None, typer.Option(help="Start only the components whose address is on this declared host.")] = None,
    live: Annotated[bool | None, typer.Option("--live/--no-live", help="Live status table (default: when stdout is a terminal).")] = None,
    backoff_cap: Annotated[float, typer.Option(min=0.1, help="Longest wait before restarting a crashed component, seconds.")] = 10.0,
) -> None:
    """Start a topology's forwarders and sidecars, restart any that crash, stop them all on Ctrl-C or SIGTERM.

    `zfabric status FILE` shows the same status from another terminal.

    Example:  zfabric up topologies/shop.yaml
    """
    from ..topology.supervisor import Supervisor

    sup = Supervisor(file, host=host, backoff_cap=backoff_cap)
    if not sup.components:
        raise ConfigError(f"{file} declares no forwarders or sidecars{' on host ' + host if host else ''}: nothing to start")
    signal.signal(signal.SIGINT, lambda s, f: sup.stop())
    signal.signal(signal.SIGTERM, lambda s, f: sup.stop())
    use_live = sys.stdout.isatty() if live is None else live
    console = Console()
    seen: dict[str, tuple[str, int]] = {}

    def ready(s: Supervisor) -> None:
        print(f"zfabric up ready topology={s.topology.name} control={s.topology.control} "
              f"components={len(s.components)}", flush=True)
        for st in s.statuses():
            print(f"zfabric up {st.kind} {st.name} running pid={st.pid} {st.address}", flush=True)
            seen[st.name] = (st.state, st.restarts)

    def changes(s: Supervisor) -> None:
        for st in s.statuses():
            if seen.get(st.name) != (st.state, st.restarts):
                seen[st.name] = (st.state, st.restarts)
                extra = f" exit={st.last_exit}" if st.state == "restarting" else f" pid={st.pid}"
                print(f"zfabric up {st.kind} {st.name} {st.state} restarts={st.restarts}{extra}", flush=True)

    if use_live:
        with Live(console=console, auto_refresh=False) as screen:
            sup.run(on_ready=ready, on_tick=lambda s: screen.update(status_table(s.report()), refresh=True), tick=0.5)
    else:
        sup.run(on_ready=ready, on_tick=changes, tick=0.2)
    print(f"zfabric up stopped topology={sup.topology.name}", flush=True)


@fabric_errors
def status(
    file: TopologyFile,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for scripts.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for `zfabric up` to answer.")] = 2.0,
) -> None:
    """Show the components `zfabric up FILE` runs: state, pid, messages in and out, restarts.

    Example:  zfabric status topologies/shop.yaml --json
    """
    from ..topology.load import load_topology
    from ..topology.supervisor import ask_status

    topology = load_topology(file)
    assert topology.control is not None
    report = ask_status(topology.control, timeout=timeout)
    if report is None:
        err_console.print(f"[red]error:[/red] no `zfabric up` answered for topology {topology.name!r} at "
                          f"{topology.control} within {timeout:g} s; start it with: zfabric up {file}", markup=True)
        raise typer.Exit(EXIT_ERROR)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        Console().print(status_table(report))


@fabric_errors
def graph(
    file: TopologyFile,
    addresses: Annotated[bool, typer.Option("--addresses/--no-addresses", help="Show each part's address.")] = True,
    markdown: Annotated[bool, typer.Option(help="Wrap in a ```mermaid block, ready to paste into Markdown.")] = False,
) -> None:
    """Print the topology as a Mermaid flowchart (apps, queues, topics, services, groups and who talks to whom).

    Example:  zfabric graph topologies/shop.yaml --markdown >> docs/shop.md
    """
    from ..topology.graph import mermaid
    from ..topology.load import load_topology

    text = mermaid(load_topology(file), addresses=addresses)
    typer.echo(f"```mermaid\n{text}```" if markdown else text.rstrip("\n"))
