"""`zfabric bench`: each pattern through zfabric and through raw pyzmq in the same run, as a table of ratios."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..errors import ConfigError
from ._common import fabric_errors

if TYPE_CHECKING:
    from ..bench.suite import Row

GROUPS = ("queue", "curve", "reqrep", "scatter", "pubsub", "reliable", "memory")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def results_table(rows: list[Row], title: str) -> Table:
    table = Table(title=title)
    for col, justify in (("figure", "left"), ("raw pyzmq", "right"), ("zfabric", "right"), ("zfabric / raw", "right"),
                         ("target", "right"), ("", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        target = "" if r.target is None else (f">= {r.target:g}x" if r.higher_is_better else f"<= {r.target:g}x")
        verdict = {True: "[green]met[/green]", False: "[red]missed[/red]", None: ""}[r.met]
        raw, zf = _fmt(r.raw, r.unit), _fmt(r.zf, r.unit) or r.note
        if "MB/s raw" in r.extra:
            raw += f"\n{r.extra['MB/s raw']:,.0f} MB/s"
            zf += f"\n{r.extra['MB/s zf']:,.0f} MB/s"
        table.add_row(r.figure, raw, zf, ratio, target, verdict)
    return table


@fabric_errors
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run, about 15 s (small counts, no repeats).")] = False,
    only: Annotated[str | None, typer.Option(help=f"Comma-separated groups: {', '.join(GROUPS)}.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the results as JSON here.")] = None,
) -> None:
    """Measure every pattern through zfabric and through raw pyzmq in the same run, each in separate processes.

    Prints messages/s, latencies and the zfabric/raw ratio of each figure with its target.
    The full run takes a few minutes; numbers depend on the machine, ratios much less.

    Example:  zfabric bench --quick
    """
    from ..bench.suite import machine, run_suite

    groups = None
    if only:
        groups = {g.strip() for g in only.split(",") if g.strip()}
        unknown = groups - set(GROUPS)
        if unknown:
            raise ConfigError(f"--only: unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    console = Console()
    info = machine()
    title = (f"zfabric bench{' --quick' if quick else ''}: {info['cpus']} CPUs, Python {info['python']}, "
             f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']})")
    rows: list[Row] = []
    started = time.monotonic()
    with Live(results_table(rows, title + "  (running...)"), console=console, auto_refresh=False,
              transient=not console.is_terminal) as live:
        def on_row(row: Row) -> None:
            rows.append(row)
            live.update(results_table(rows, title + "  (running...)"), refresh=True)

        run_suite(quick, on_row=on_row, only=groups)
    console.print(results_table(rows, title))
    console.print(f"took {time.monotonic() - started:.0f} s")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"command": "zfabric bench" + (" --quick" if quick else ""), "machine": info,
                                      "rows": [r.to_dict() for r in rows]}, indent=2))
        console.print(f"results written to {output}")
