"""`zfabric forwarder`: run a pub/sub forwarder until SIGINT/SIGTERM, showing its counters."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..errors import ConfigError
from ..options import DEFAULT_FORWARDER_XPUB, DEFAULT_FORWARDER_XSUB, SocketOptions
from ._common import RateView, fabric_errors, topology_part

if TYPE_CHECKING:
    from ..patterns.forwarder import Forwarder


class CountersView:
    """The forwarder's counters as a rich table, with per-second rates since the last refresh."""

    GAUGES = frozenset({"subscriptions"})
    """Counters that go up and down; a rate means nothing for them."""

    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self._rates = RateView()
        self._rates.rates(fwd.stats.snapshot())

    def table(self) -> Table:
        current = self.fwd.stats.snapshot()
        rates = self._rates.rates(current)
        table = Table(title=f"forwarder  xsub={self.fwd.xsub_endpoint}  xpub={self.fwd.xpub_endpoint}")
        table.add_column("counter")
        table.add_column("total", justify="right")
        table.add_column("per second", justify="right")
        for name, value in current.items():
            rate = "" if name in self.GAUGES else f"{rates[name]:,.0f}"
            table.add_row(name.replace("_", " "), f"{value:,}", rate)
        return table


def counters_line(fwd: Forwarder) -> str:
    """The counters on one line, for logs."""
    return "zfabric forwarder counters " + " ".join(f"{k}={v}" for k, v in fwd.stats.snapshot().items())


@fabric_errors
def forwarder(
    xsub: Annotated[str, typer.Option(envvar="ZFABRIC_XSUB", help="Bind address publishers connect to (port 0: any free port).")] = DEFAULT_FORWARDER_XSUB,
    xpub: Annotated[str, typer.Option(envvar="ZFABRIC_XPUB", help="Bind address subscribers connect to (port 0: any free port).")] = DEFAULT_FORWARDER_XPUB,
    live: Annotated[bool | None, typer.Option("--live/--no-live", help="Live counters table (default: when stdout is a terminal).")] = None,
    stats_interval: Annotated[float, typer.Option(help="With --no-live, print counters every N seconds (0: only on exit and SIGUSR1).")] = 0.0,
    hwm: Annotated[int | None, typer.Option(min=0, help="High-water mark per peer, both directions (messages; 0: unlimited; default 1000). Past it a slow subscriber loses messages, and its gap counter shows how many.")] = None,
    topology: Annotated[Path | None, typer.Option(help="Run a forwarder declared in this topology file, with its addresses and options.")] = None,
    name: Annotated[str | None, typer.Option(help="With --topology: which forwarder (needed when it declares several).")] = None,
) -> None:
    """Run a pub/sub forwarder (XSUB -> XPUB) until Ctrl-C or SIGTERM.

    Prints a ready line with the bound addresses, counters on SIGUSR1 and on exit.

    Example:  zfabric forwarder --xsub tcp://127.0.0.1:5559 --xpub tcp://127.0.0.1:5560
              zfabric forwarder --topology topologies/shop.yaml --name events
    """
    from ..patterns.forwarder import Forwarder

    if topology is not None:
        if (xsub, xpub) != (DEFAULT_FORWARDER_XSUB, DEFAULT_FORWARDER_XPUB) or hwm is not None:
            raise ConfigError("--topology gives the forwarder's addresses and options; leave out --xsub, --xpub and --hwm")
        fabric, name = topology_part(topology, "forwarder", name)
        fwd = fabric.forwarder(name)
    else:
        limit = 1000 if hwm is None else hwm
        fwd = Forwarder(xsub, xpub, options=SocketOptions(send_hwm=limit, receive_hwm=limit))
    console = Console()
    use_live = sys.stdout.isatty() if live is None else live

    def stop(signum: int, frame: object) -> None:
        fwd.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda s, f: print(counters_line(fwd), flush=True))

    def ready(f: Forwarder) -> None:
        print(f"zfabric forwarder ready xsub={f.xsub_endpoint} xpub={f.xpub_endpoint}", flush=True)

    if use_live:
        counters = CountersView(fwd)
        with Live(console=console, auto_refresh=False) as view:
            fwd.run(on_ready=ready, on_tick=lambda f: view.update(counters.table(), refresh=True), tick=0.5)
        console.print(counters.table())
    else:
        tick = stats_interval if stats_interval > 0 else 3600.0
        fwd.run(on_ready=ready, on_tick=lambda f: print(counters_line(f), flush=True) if stats_interval > 0 else None, tick=tick)
        print(counters_line(fwd), flush=True)
