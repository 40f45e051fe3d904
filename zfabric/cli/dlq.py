"""`zfabric dlq`: list, show, replay, purge and export dead letters, from a running sidecar or its store file."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..errors import ConfigError
from ..sidecar.config import DEFAULT_SIDECAR_ENDPOINT
from ._common import dumps, fabric_errors, sidecar_client

if TYPE_CHECKING:
    from ..sidecar.client import DeadLetterAccess
    from ..sidecar.store import DeadLetterFilter, MessageRecord

app = typer.Typer(help="Inspect and replay dead letters (against a running sidecar, or its --store file).",
                  no_args_is_help=True)

EndpointOpt = Annotated[str | None, typer.Option("--endpoint", "-e", envvar="ZFABRIC_SIDECAR",
                                                 help=f"A running sidecar's address [default: {DEFAULT_SIDECAR_ENDPOINT}].")]
StoreOpt = Annotated[Path | None, typer.Option(help="The store file of a stopped sidecar (instead of --endpoint).")]
TopologyOpt = Annotated[Path | None, typer.Option(
    help="Find the sidecar in this topology file: its address and, with CURVE, its key (this tool connects as "
         "$ZFABRIC_IDENTITY, which needs queues: ['*']).")]
SidecarOpt = Annotated[str | None, typer.Option("--sidecar", help="With --topology: which sidecar, when it declares several.")]
QueueOpt = Annotated[str | None, typer.Option("--queue", "-q", help="Only this queue.")]
ErrorOpt = Annotated[str | None, typer.Option("--error-type", help="Only this error type (e.g. ValueError, LeaseExpired).")]
SinceOpt = Annotated[str | None, typer.Option(help="Dead-lettered at or after: ISO time (2026-11-26T10:00) or an age (30m, 2h, 1d).")]
UntilOpt = Annotated[str | None, typer.Option(help="Dead-lettered before: ISO time or an age.")]
IdOpt = Annotated[list[str] | None, typer.Option("--id", help="Only this message id (32 hex digits; repeat for more).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output, for scripts.")]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str | None, option: str) -> float | None:
    """Epoch seconds from an ISO time or an age like 30m ("30 minutes ago")."""
    if text is None:
        return None
    m = _AGE.match(text.strip())
    if m:
        return time.time() - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected an ISO time like 2026-11-26T10:00 or an age like 30m, 2h, 1d") from None


def make_filter(queue: str | None, error_type: str | None, since: str | None, until: str | None,
                ids: list[str] | None, limit: int | None = None) -> DeadLetterFilter:
    from ..sidecar.store import DeadLetterFilter

    raw_ids = None
    if ids:
        try:
            raw_ids = tuple(bytes.fromhex(i) for i in ids)
        except ValueError:
            raise ConfigError(f"--id: expected hex message ids, got {ids!r}") from None
    return DeadLetterFilter(queue=queue, error_type=error_type, since=parse_time(since, "--since"),
                            until=parse_time(until, "--until"), ids=raw_ids, limit=limit)


@contextmanager
def access(endpoint: str | None, store: Path | None, topology: Path | None = None,
           sidecar: str | None = None) -> Iterator[DeadLetterAccess]:
    """A running sidecar over its control endpoint (found in a topology, with its keys), or a stopped one's store."""
    from ..sidecar.client import OfflineDeadLetters, SidecarClient

    if sum(x is not None for x in (endpoint, store, topology)) > 1:
        raise ConfigError("give --endpoint (a running sidecar), --topology (find it there) or --store "
                          "(a stopped one's file), not both")
    if topology is not None:
        client = sidecar_client(topology, sidecar)
        try:
            yield client
        finally:
            client.close(0)
        return
    if store is not None:
        with OfflineDeadLetters(store) as offline:
            yield offline
        return
    client = SidecarClient(endpoint or DEFAULT_SIDECAR_ENDPOINT)
    try:
        yield client
    finally:
        client.close(0)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _last_error(r: MessageRecord) -> str:
    for a in reversed(r.history):
        if a.error_message:
            return a.error_message[:60]
    return ""


@app.command("list")
@fabric_errors
def list_(endpoint: EndpointOpt = None, store: StoreOpt = None, topology: TopologyOpt = None,
          sidecar: SidecarOpt = None, queue: QueueOpt = None, error_type: ErrorOpt = None,
          since: SinceOpt = None, until: UntilOpt = None, limit: Annotated[int, typer.Option(min=1)] = 100,
          as_json: JsonOpt = False) -> None:
    """List dead letters, oldest first.

    Example:  zfabric dlq list --queue orders --since 1h
    """
    from ..sidecar.store import DeadLetterFilter

    flt = make_filter(queue, error_type, since, until, None, limit)
    with access(endpoint, store, topology, sidecar) as dl:
        records = dl.dead_letters(flt, history=True)
        total = dl.count(DeadLetterFilter(queue=flt.queue, error_type=flt.error_type, since=flt.since, until=flt.until))
    if as_json:
        for r in records:
            typer.echo(dumps({k: v for k, v in r.to_dict().items() if k != "envelope"} | {"history": len(r.history)}))
        return
    table = Table(title=f"dead letters: {len(records)} shown of {total}")
    table.add_column("id", no_wrap=True, min_width=32)
    for col in ("queue", "attempts", "reason", "error type", "last error", "dead at"):
        table.add_column(col)
    for r in records:
        table.add_row(r.id.hex(), r.queue, str(r.attempts), r.reason or "", r.error_type or "", _last_error(r), _when(r.finished_at))
    Console().print(table)


@app.command()
@fabric_errors
def show(message_id: Annotated[str, typer.Argument(help="The message id, or a unique start or end of it (8+ hex digits).")],
         endpoint: EndpointOpt = None, store: StoreOpt = None, topology: TopologyOpt = None,
          sidecar: SidecarOpt = None, as_json: JsonOpt = False) -> None:
    """Show one message: its original envelope, state, and every attempt with its error and traceback.

    Example:  zfabric dlq show 0000000000000008
    """
    with access(endpoint, store, topology, sidecar) as dl:
        record = dl.record(message_id)
    if record is None:
        raise ConfigError(f"no message {message_id!r} in the store (purged, acknowledged long ago, or never seen)")
    if as_json:
        typer.echo(dumps(record.to_dict()))
        return
    console = Console()
    d = record.to_dict()
    console.print(f"[bold]{d['id']}[/bold] queue={d['queue']} state={d['state']} attempts={d['attempts']} "
                  f"reason={d['reason'] or '-'} received={_when(record.received_at)} finished={_when(record.finished_at)}")
    env = d["envelope"]
    if env is not None:
        console.print(f"body: {dumps(env['body'])}")
        if env["headers"]:
            console.print(f"headers: {dumps(env['headers'])}")
    for a in record.history:
        console.print(f"  #{a.attempt} {_when(a.at)} {a.outcome} worker={a.worker or '-'} "
                      f"{a.error_type or ''}: {a.error_message or ''}")
        if a.traceback:
            console.print("    " + a.traceback.rstrip().replace("\n", "\n    "), markup=False, highlight=False)


@app.command()
@fabric_errors
def replay(endpoint: EndpointOpt = None, store: StoreOpt = None, topology: TopologyOpt = None,
          sidecar: SidecarOpt = None, queue: QueueOpt = None, error_type: ErrorOpt = None,
           since: SinceOpt = None, until: UntilOpt = None, message_id: IdOpt = None,
           rate: Annotated[float | None, typer.Option(min=0.001, help="At most this many messages per second.")] = None,
           as_json: JsonOpt = False) -> None:
    """Send dead letters back to their queue: same id and history, a fresh attempt budget.

    Example:  zfabric dlq replay --queue orders --error-type TimeoutError --rate 100
    """
    from ..sidecar.store import DeadLetterFilter

    flt = make_filter(queue, error_type, since, until, message_id)
    replayed, not_served = 0, set()
    with access(endpoint, store, topology, sidecar) as dl:
        total = dl.count(flt)
        chunk = max(1, min(100, int(rate))) if rate else 100
        with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), disable=as_json or not sys.stderr.isatty()) as bar:
            task = bar.add_task("replay", total=total)
            started = time.monotonic()
            while replayed < total:
                result = dl.replay(DeadLetterFilter(flt.queue, flt.error_type, flt.since, flt.until, flt.ids, 0, chunk))
                if not result["replayed"]:
                    break
                replayed += result["replayed"]
                not_served.update(result.get("not_served", []))
                bar.update(task, completed=replayed)
                if rate:
                    ahead = replayed / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
    if as_json:
        typer.echo(json.dumps({"replayed": replayed, "not_served": sorted(not_served)}))
    else:
        where = "; they wait in the store until the sidecar starts" if store is not None else ""
        typer.echo(f"replayed {replayed} message(s){where}")
        if not_served:
            typer.echo(f"warning: queue(s) {', '.join(sorted(not_served))} are not served by this sidecar", err=True)


@app.command()
@fabric_errors
def purge(endpoint: EndpointOpt = None, store: StoreOpt = None, topology: TopologyOpt = None,
          sidecar: SidecarOpt = None, queue: QueueOpt = None, error_type: ErrorOpt = None,
          since: SinceOpt = None, until: UntilOpt = None, message_id: IdOpt = None,
          yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False) -> None:
    """Delete dead letters for good (export them first if you may need them).

    Example:  zfabric dlq purge --queue orders --until 7d --yes
    """
    flt = make_filter(queue, error_type, since, until, message_id)
    with access(endpoint, store, topology, sidecar) as dl:
        n = dl.count(flt)
        if n and not yes and not typer.confirm(f"delete {n} dead letter(s) for good?"):
            raise typer.Exit(1)
        purged = dl.purge(flt) if n else 0
    typer.echo(f"purged {purged} dead letter(s)")


@app.command()
@fabric_errors
def export(endpoint: EndpointOpt = None, store: StoreOpt = None, topology: TopologyOpt = None,
          sidecar: SidecarOpt = None, queue: QueueOpt = None, error_type: ErrorOpt = None,
           since: SinceOpt = None, until: UntilOpt = None, message_id: IdOpt = None,
           output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None) -> None:
    """Write dead letters as JSON lines: envelope, reason, and full history (bytes as {"$base64": ...}).

    Example:  zfabric dlq export --queue orders -o orders-dead.jsonl
    """
    from ..sidecar.client import iter_dead_letters

    flt = make_filter(queue, error_type, since, until, message_id)
    out: Any = open(output, "w") if output is not None else sys.stdout
    n = 0
    try:
        with access(endpoint, store, topology, sidecar) as dl:
            for record in iter_dead_letters(dl, flt):
                out.write(dumps(record.to_dict()) + "\n")
                n += 1
    finally:
        if output is not None:
            out.close()
    if output is not None:
        typer.echo(f"exported {n} dead letter(s) to {output}", err=True)
