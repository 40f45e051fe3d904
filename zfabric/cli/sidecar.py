"""`zfabric sidecar`: run a reliable-queue sidecar; `zfabric sidecar stats`: a running one's counters."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..errors import ConfigError
from ..sidecar.config import DEFAULT_SIDECAR_ENDPOINT, SidecarConfig
from ._common import RateView, fabric_errors, sidecar_client, topology_part

app = typer.Typer(no_args_is_help=False)

Endpoint = Annotated[str, typer.Option("--endpoint", "-e", envvar="ZFABRIC_SIDECAR", help="The sidecar's address.")]


def counters_table(snap: dict[str, Any], view: RateView | None = None) -> Table:
    """A sidecar snapshot as a rich table (rates per second when `view` tracks them)."""
    from ..sidecar.ledger import GAUGES

    table = Table(title=f"sidecar  {snap.get('endpoint', '')}  store={snap.get('store', '')}")
    table.add_column("counter")
    table.add_column("total", justify="right")
    if view is not None:
        table.add_column("per second", justify="right")
    rates = view.rates(snap["counters"]) if view is not None else {}
    for name, value in snap["counters"].items():
        row = [name.replace("_", " "), f"{value:,}"]
        if view is not None:
            row.append("" if name in GAUGES else f"{rates.get(name, 0):,.0f}")
        table.add_row(*row)
    for state, n in snap.get("stored", {}).items():
        table.add_row(f"stored {state}", f"{n:,}", *([""] if view is not None else []))
    return table


@app.callback(invoke_without_command=True)
@fabric_errors
def sidecar(
    ctx: typer.Context,
    queue: Annotated[list[str] | None, typer.Option("--queue", "-q", help="A queue this sidecar owns (repeat for more).")] = None,
    store: Annotated[Path | None, typer.Option(help="SQLite store file (created if missing).")] = None,
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", envvar="ZFABRIC_SIDECAR", help="Bind address (port 0: any free port).")] = DEFAULT_SIDECAR_ENDPOINT,
    config: Annotated[Path | None, typer.Option(help="YAML file with the settings below and per-queue policies.")] = None,
    max_attempts: Annotated[int, typer.Option(min=1, help="Deliveries before a failing message is dead-lettered.")] = 5,
    backoff_base: Annotated[float, typer.Option(min=0, help="Seconds before the first retry.")] = 0.5,
    backoff_cap: Annotated[float, typer.Option(min=0, help="Longest wait between attempts, seconds.")] = 60.0,
    ttl: Annotated[float | None, typer.Option(help="Seconds a message may wait before it expires (default: forever).")] = None,
    lease_timeout: Annotated[float, typer.Option(help="A worker silent this long loses its messages to others.")] = 3.0,
    synchronous: Annotated[str, typer.Option(help="full: survives power loss; normal: survives process crashes only.")] = "full",
    live: Annotated[bool | None, typer.Option("--live/--no-live", help="Live counters table (default: when stdout is a terminal).")] = None,
    stats_interval: Annotated[float, typer.Option(help="With --no-live, print counters every N seconds (0: only on exit and SIGUSR1).")] = 0.0,
    topology: Annotated[Path | None, typer.Option(help="Run a sidecar declared in this topology file, with its queues and policies.")] = None,
    name: Annotated[str | None, typer.Option(help="With --topology: which sidecar (needed when it declares several).")] = None,
) -> None:
    """Run a sidecar that owns reliable queues: confirms durable writes, leases messages to workers,
    retries with backoff and keeps what keeps failing in its dead-letter queue.

    Example:  zfabric sidecar --queue orders --store orders.db --max-attempts 5
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..sidecar.policy import RetryPolicy
    from ..sidecar.service import Sidecar

    if topology is not None:
        if config is not None or queue or store:
            raise ConfigError("--topology gives the sidecar's queues, store and policies; leave out --config, --queue and --store")
        fabric, name = topology_part(topology, "sidecar", name)
        sc = fabric.sidecar(name)
        cfg = sc.config
    elif config is not None:
        cfg = SidecarConfig.from_file(config)
        if queue or store:
            raise ConfigError("give queues and store either in --config or as options, not both")
        cfg = cfg.replace(endpoint=endpoint) if endpoint != DEFAULT_SIDECAR_ENDPOINT else cfg
    else:
        if not queue or store is None:
            raise ConfigError("give at least one --queue and a --store file (or a --config file)")
        policy = RetryPolicy(max_attempts=max_attempts, backoff_base=backoff_base, backoff_cap=backoff_cap, ttl=ttl)
        cfg = SidecarConfig(store=store, queues={q: policy for q in queue}, endpoint=endpoint,
                            lease_timeout=lease_timeout, synchronous=synchronous)
    if topology is None:
        sc = Sidecar(config=cfg)
    use_live = sys.stdout.isatty() if live is None else live

    def stop(signum: int, frame: object) -> None:
        sc.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def line() -> str:
        return "zfabric sidecar counters " + " ".join(f"{k}={v}" for k, v in sc.stats.snapshot().items())

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda s, f: print(line(), flush=True))

    def ready(s: Sidecar) -> None:
        print(f"zfabric sidecar ready endpoint={s.endpoint} store={cfg.store} queues={','.join(cfg.queues)}", flush=True)

    if use_live:
        console, view = Console(), RateView()
        with Live(console=console, auto_refresh=False) as screen:
            sc.run(on_ready=ready, on_tick=lambda s: screen.update(counters_table(s.snapshot(), view), refresh=True), tick=0.5)
        console.print(counters_table(sc.snapshot()))
    else:
        tick = stats_interval if stats_interval > 0 else 3600.0
        sc.run(on_ready=ready, on_tick=lambda s: print(line(), flush=True) if stats_interval > 0 else None, tick=tick)
        print(line(), flush=True)


@app.command()
@fabric_errors
def stats(
    endpoint: Endpoint = DEFAULT_SIDECAR_ENDPOINT,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for scripts.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 5.0,
    topology: Annotated[Path | None, typer.Option(help="Find the sidecar in this topology file (address and CURVE "
                                                       "keys; this tool connects as $ZFABRIC_IDENTITY).")] = None,
    name: Annotated[str | None, typer.Option(help="With --topology: which sidecar, when it declares several.")] = None,
) -> None:
    """Print a running sidecar's counters, queues and workers.

    Example:  zfabric sidecar stats --endpoint tcp://127.0.0.1:5580 --json
              ZFABRIC_IDENTITY=ops zfabric sidecar stats --topology shop.yaml
    """
    from ..sidecar.client import SidecarClient

    client = (sidecar_client(topology, name, timeout) if topology is not None
              else SidecarClient(endpoint, timeout=timeout, options=None))
    with client:
        snap = client.stats()
    if as_json:
        typer.echo(json.dumps(snap))
        return
    console = Console()
    console.print(counters_table(snap))
    for w in snap.get("workers", []):
        console.print(f"worker {w['worker']} queue={w['queue']} in flight {w['in_flight']}/{w['window']}")
